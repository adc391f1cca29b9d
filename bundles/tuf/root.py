"""Signed root metadata: the trust anchor every device starts from.

Version 1 is signed by its own root keys. A rotation (version N+1) is signed by a threshold of the
*previous* root keys and of the *new* root keys, so a device that trusts version N can walk to
N+1 and an attacker holding only old or only new keys cannot. :func:`next_root` keeps every role
that is not being changed, which is the usual case (for example: only the timestamp key rotates).

Roots use consistent snapshots (versioned metadata names, hash-prefixed target files) so the
repository can be updated while devices read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from securesystemslib.signer import Key, Signer
from tuf.api.metadata import Metadata, Role, Root

from bundles.errors import ConfigError
from bundles.tuf.common import (
    TOP_LEVEL_ROLES,
    expires_after,
    key_of,
    parse_metadata,
    serialize,
    verify_root_chain,
)

KeyLike = Key | Signer


def make_root(
    root_signers: Sequence[Signer],
    targets_keys: Sequence[KeyLike],
    snapshot_key: KeyLike,
    timestamp_key: KeyLike,
    version: int = 1,
    expires_days: float = 365,
    previous_root_signers: Sequence[Signer] = (),
    *,
    thresholds: Mapping[str, int] | None = None,
    now: datetime | None = None,
) -> bytes:
    """Build and sign root metadata ``version`` with the given role keys.

    ``previous_root_signers`` sign too when this root rotates an older one (version > 1).
    ``thresholds`` maps a role to how many of its keys must sign (default 1 each).
    """
    if not root_signers:
        raise ConfigError("a root needs at least one root signer")
    keys_by_role: dict[str, Sequence[KeyLike]] = {
        "root": root_signers,
        "targets": targets_keys,
        "snapshot": [snapshot_key],
        "timestamp": [timestamp_key],
    }
    root = _root_with_keys(keys_by_role, version, thresholds or {})
    root.expires = expires_after(timedelta(days=expires_days), now)
    return _sign_root(root, root_signers, previous_root_signers)


def next_root(
    previous_root_bytes: bytes,
    previous_root_signers: Sequence[Signer],
    *,
    root_signers: Sequence[Signer] | None = None,
    targets_keys: Sequence[KeyLike] | None = None,
    snapshot_key: KeyLike | None = None,
    timestamp_key: KeyLike | None = None,
    expires_days: float = 365,
    now: datetime | None = None,
) -> bytes:
    """Rotate: version N+1 of a root, replacing only the roles given, signed by old and new root keys.

    When the root keys themselves do not change, ``root_signers`` may be omitted: the previous
    root signers then sign as both old and new keys.
    """
    previous = parse_metadata(previous_root_bytes, Root, "previous root").signed
    new_root_signers = root_signers if root_signers is not None else previous_root_signers
    replacements: dict[str, Sequence[KeyLike] | None] = {
        "root": root_signers,
        "targets": targets_keys,
        "snapshot": None if snapshot_key is None else [snapshot_key],
        "timestamp": None if timestamp_key is None else [timestamp_key],
    }
    keys_by_role = {role: _keys_for(previous, role, replacements[role]) for role in TOP_LEVEL_ROLES}
    thresholds = {role: previous.roles[role].threshold for role in TOP_LEVEL_ROLES}
    root = _root_with_keys(keys_by_role, previous.version + 1, thresholds)
    root.expires = expires_after(timedelta(days=expires_days), now)
    return _sign_root(root, new_root_signers, previous_root_signers)


def role_keys(root_bytes: bytes, role: str) -> list[Key]:
    """The public keys of ``role`` in a root (unverified: for display and key checks)."""
    root = parse_metadata(root_bytes, Root, "root").signed
    return [root.get_key(keyid) for keyid in root.roles[role].keyids]


def verify_root(new_root_bytes: bytes, previous_root_bytes: bytes | None = None) -> Metadata[Root]:
    """Parse a root and check it against its predecessor (or itself, for version 1); return it."""
    md = parse_metadata(new_root_bytes, Root, "new root")
    previous = None if previous_root_bytes is None else parse_metadata(previous_root_bytes, Root, "root").signed
    verify_root_chain(previous, md, f"root v{md.signed.version}")
    return md


def describe_root_difference(trusted_bytes: bytes, other_bytes: bytes) -> str:
    """What ``other`` changes in ``trusted``: version, keys added or removed and thresholds, per role.

    For error messages that must say *what* differs (an added targets key is how a compromised
    server would try to have its own bundles trusted).
    """
    trusted = parse_metadata(trusted_bytes, Root, "trusted root").signed
    other = parse_metadata(other_bytes, Root, "other root").signed
    parts = [] if other.version == trusted.version else [f"version {trusted.version} -> {other.version}"]
    for role in TOP_LEVEL_ROLES:
        before, after = trusted.roles[role], other.roles[role]
        added, removed = sorted(set(after.keyids) - set(before.keyids)), sorted(set(before.keyids) - set(after.keyids))
        if added:
            parts.append(f"{role} keys added: {', '.join(k[:12] for k in added)}")
        if removed:
            parts.append(f"{role} keys removed: {', '.join(k[:12] for k in removed)}")
        if before.threshold != after.threshold:
            parts.append(f"{role} threshold {before.threshold} -> {after.threshold}")
    if trusted.expires != other.expires:
        parts.append(f"expiry {trusted.expires.isoformat()} -> {other.expires.isoformat()}")
    return "; ".join(parts) or "same keys, other signatures or fields"


def _keys_for(previous: Root, role: str, replacement: Sequence[KeyLike] | None) -> Sequence[KeyLike]:
    if replacement is not None:
        return replacement
    return [previous.get_key(keyid) for keyid in previous.roles[role].keyids]


def _root_with_keys(keys_by_role: Mapping[str, Sequence[KeyLike]], version: int, thresholds: Mapping[str, int]) -> Root:
    roles = {role: Role([], thresholds.get(role, 1)) for role in TOP_LEVEL_ROLES}
    root = Root(version=version, roles=roles, consistent_snapshot=True)
    for role, keys in keys_by_role.items():
        if len(keys) < roles[role].threshold:
            raise ConfigError(f"role {role} has {len(keys)} keys but a threshold of {roles[role].threshold}")
        for key in keys:
            root.add_key(key_of(key), role)
    return root


def _sign_root(root: Root, root_signers: Sequence[Signer], previous_root_signers: Sequence[Signer]) -> bytes:
    md = Metadata(root)
    signed_ids: set[str] = set()
    for signer in [*previous_root_signers, *root_signers]:
        if signer.public_key.keyid not in signed_ids:
            md.sign(signer, append=True)
            signed_ids.add(signer.public_key.keyid)
    return serialize(md)


__all__ = ["describe_root_difference", "make_root", "next_root", "role_keys", "verify_root"]

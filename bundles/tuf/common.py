"""Shared pieces of the TUF helpers: expiry policy, metadata checks, and the crash-safe writes they use.

The writes themselves live in :mod:`bundles.durable` (re-exported here for the TUF modules).

Every check here raises an error from :mod:`bundles.errors` with one readable sentence, so the
repository (server side) and the publication code (workstation side) reject bad metadata with the
same errors the device client uses: ``BadSignatureError``, ``ExpiredMetadataError``,
``VersionConflictError``, or ``TrustError`` for metadata that cannot even be parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import RepositoryError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Signed, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from bundles.durable import atomic_file, atomic_write_bytes, fsync_dir
from bundles.errors import BadSignatureError, ConfigError, ExpiredMetadataError, TrustError, VersionConflictError

TOP_LEVEL_ROLES = ("root", "targets", "snapshot", "timestamp")
# Compact JSON: smaller files on slow device links; the signature covers the canonical form anyway.
SERIALIZER = JSONSerializer(compact=True)
T = TypeVar("T", Root, Timestamp, Snapshot, Targets)


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed.

    Short online roles bound a freeze attack (a server that keeps serving old metadata); long
    offline roles spare the release engineer frequent signing ceremonies.
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def for_role(self, role: str) -> timedelta:
        """The validity period of ``role``."""
        value: timedelta = getattr(self, role)
        return value


def utc_now() -> datetime:
    """The current time in UTC, to the second (TUF expiry dates have no fractions)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def expires_after(delta: timedelta, now: datetime | None = None) -> datetime:
    """The expiry date ``delta`` after ``now`` (default: the current time)."""
    return (now or utc_now()) + delta


def key_of(key_or_signer: Key | Signer) -> Key:
    """The public key of a signer, or the key itself; lets callers pass either."""
    if isinstance(key_or_signer, Signer):
        return key_or_signer.public_key
    return key_or_signer


# --- parsing and verifying metadata -----------------------------------------------------------------
def parse_metadata(data: bytes, role_class: type[T], what: str) -> Metadata[T]:
    """Parse signed metadata of the expected role, or raise :class:`TrustError` naming ``what``."""
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except (RepositoryError, ValueError, TypeError, KeyError) as e:
        raise TrustError(f"{what} is not valid TUF metadata: {e}") from e
    if not isinstance(md.signed, role_class):
        raise TrustError(f"{what} is {md.signed.type} metadata, expected {role_class.type}")
    return md


def serialize(md: Metadata[Any]) -> bytes:
    """The bytes of signed metadata as the repository stores and serves them."""
    return md.to_bytes(SERIALIZER)


def verify_signatures(delegator: Root, role: str, md: Metadata[Any], what: str) -> None:
    """Raise :class:`BadSignatureError` unless ``md`` carries a threshold of ``role``'s keys in ``delegator``."""
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as e:
        raise BadSignatureError(f"{what} is not signed by enough {role} keys of root v{delegator.version}: {e}") from e


def verify_root_chain(previous: Root | None, md: Metadata[Root], what: str) -> None:
    """Check a new root: version ``previous + 1`` and a threshold of both the old and the new root keys.

    Without ``previous`` the root must be version 1 and signed by a threshold of its own keys.
    """
    expected = 1 if previous is None else previous.version + 1
    if md.signed.version != expected:
        raise VersionConflictError(f"{what} has version {md.signed.version}, expected {expected}")
    if previous is not None:
        verify_signatures(previous, "root", md, f"{what} (checked against the previous root)")
    verify_signatures(md.signed, "root", md, f"{what} (checked against its own keys)")


def check_not_expired(signed: Signed, now: datetime, what: str) -> None:
    """Raise :class:`ExpiredMetadataError` if ``signed`` expires at or before ``now``."""
    if signed.is_expired(now):
        raise ExpiredMetadataError(f"{what} expired at {signed.expires.isoformat()}")


def check_signer_role(root: Root, role: str, signer: Signer) -> None:
    """Refuse a signer whose key is not one of ``role``'s keys: its signatures would be useless."""
    keyid = signer.public_key.keyid
    if keyid not in root.roles[role].keyids:
        raise ConfigError(f"the given {role} signer (key {keyid[:12]}) is not a {role} key of root v{root.version}")


__all__ = [
    "SERIALIZER",
    "TOP_LEVEL_ROLES",
    "Expiry",
    "atomic_file",
    "atomic_write_bytes",
    "check_not_expired",
    "check_signer_role",
    "expires_after",
    "fsync_dir",
    "key_of",
    "parse_metadata",
    "serialize",
    "utc_now",
    "verify_root_chain",
    "verify_signatures",
]

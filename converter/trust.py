"""The release workstation's own record: the root it pinned and the ledger of what it signed.

A fleet server serves the TUF repository, so whoever controls the server controls what it *says*
is the current root and the current targets. The release key must never sign on that word. For
each destination (a server URL or a local repository directory) this module keeps, under
``$EDGEFLEET_HOME/trust/<destination>/``:

- ``root.json``: the **pinned root**. The first publication pins the root it installs (or, for a
  repository that already has one, ``1.root.json`` if this workstation's root key signed it). Later
  the server's root is accepted only as a chain from the pinned one, each version signed by a
  threshold of the previous *and* its own root keys (as a device walks it); anything else is refused
  with what differs (:class:`~bundles.errors.UntrustedRecordError`).
- ``ledger.json``: the **ledger**: the targets version last known current, the sha256 of its
  canonical signed form, every listed target (length, hashes, ``custom``, the version that first
  signed it), the per-model version floors, and a history. The next targets version is built from
  the ledger, never from the server's copy (:func:`reconcile`).
- ``pending.targets.json``: targets signed but not yet known to be accepted, so that a publication
  whose answer was lost is recognised as our own next time.

How the server's current targets (version S) meet the ledger (version L), in :func:`reconcile`:

- S < L: a replayed or rolled-back repository: refused.
- S = L: must be exactly what the ledger holds (same canonical signed bytes); an extra, missing or
  changed entry is refused, never re-signed.
- S > L: another release workstation (a teammate) published since. Accepted only if targets S is
  signed by a threshold of the pinned root's targets keys, and shown in the diff as such.
- A server targets version that the release key did not sign is refused, whatever its version.

A team shares the ledger as a file signed by the targets key (:func:`export_ledger` /
:func:`import_ledger`): importing checks the signature against the pinned root's targets keys (or,
on a workstation with no pin yet, against its own targets key, which the exported root must list),
and walks the exported roots from the pinned one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key, Signature, Signer
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from bundles.canonical import canonical_json, sha256_bytes
from bundles.errors import BadSignatureError, ConfigError, EdgeFleetError, TrustError, UntrustedRecordError
from bundles.tuf.common import atomic_write_bytes, parse_metadata, verify_root_chain, verify_signatures
from bundles.tuf.root import describe_root_difference
from converter.home import Home

LEDGER_FORMAT = 1
EXPORT_TYPE = "edgefleet-ledger"
_SHOWN = 5


# --- the ledger ------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every target this workstation (or its team) signed for one destination, as of ``targets_version``."""

    destination: str
    targets_version: int = 0
    signed_sha256: str | None = None
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    floors: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": LEDGER_FORMAT, "destination": self.destination, "targets_version": self.targets_version,
                "signed_sha256": self.signed_sha256, "targets": self.targets, "floors": self.floors,
                "history": self.history}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Ledger:
        """A ledger read back from JSON; a damaged one is a :class:`TrustError` naming ``where``."""
        try:
            if data.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format {data.get('format')!r} is not {LEDGER_FORMAT}")
            ledger = cls(str(data["destination"]), int(data["targets_version"]), data.get("signed_sha256"),
                         dict(data["targets"]), {str(k): int(v) for k, v in data.get("floors", {}).items()},
                         list(data.get("history", [])))  # fmt: skip
            ledger.target_files()  # every entry must be a valid target
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TrustError(f"the ledger {where} is damaged ({e}); restore it from a backup or a team export") from e
        return ledger

    def target_files(self) -> dict[str, TargetFile]:
        """The listed targets as TUF target infos (what the next targets version starts from)."""
        return {path: TargetFile.from_dict(dict(entry_info(entry)), path) for path, entry in self.targets.items()}

    def record(self, version: int, signed_sha256: str, listed: Mapping[str, TargetFile], how: str) -> None:
        """Make targets ``version`` (with exactly ``listed``) the current state, and say how in the history."""
        before = set(self.targets)
        self.targets = {path: {**info.to_dict(), "signed_in": self.targets.get(path, {}).get("signed_in", version)}
                        for path, info in sorted(listed.items())}  # fmt: skip
        self.history.append({"version": version, "at": _now(), "how": how,
                             "added": sorted(set(self.targets) - before),
                             "removed": sorted(before - set(self.targets))})  # fmt: skip
        self.targets_version, self.signed_sha256 = version, signed_sha256


def entry_info(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A ledger entry without its bookkeeping: the TUF ``targets`` item."""
    return {k: v for k, v in entry.items() if k != "signed_in"}


def signed_sha256(md: Metadata[Any]) -> str:
    """The sha256 of the canonical signed part: what identifies a metadata version whatever its serialisation."""
    return hashlib.sha256(md.signed_bytes).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


# --- where it is kept ---------------------------------------------------------------------------------


class TrustStore:
    """The pinned root, the ledger and a pending publication for one destination."""

    def __init__(self, home: Home, destination: str) -> None:
        self.destination = destination
        self.dir = home.root / "trust" / destination_slug(destination)

    @property
    def root_path(self) -> Path:
        return self.dir / "root.json"

    def pinned_root(self) -> bytes | None:
        return self.root_path.read_bytes() if self.root_path.is_file() else None

    def pin_root(self, root_bytes: bytes) -> None:
        self._write("root.json", root_bytes)

    def keep_root(self, root_bytes: bytes) -> None:
        """Keep a verified root version (``roots/N.root.json``): a team export carries the whole chain."""
        version = parse_metadata(root_bytes, Root, "root").signed.version
        self._write(f"roots/{version}.root.json", root_bytes)

    def has_root_version(self, version: int) -> bool:
        return (self.dir / "roots" / f"{version}.root.json").is_file()

    def root_version(self, version: int) -> bytes:
        path = self.dir / "roots" / f"{version}.root.json"
        if not path.is_file():
            raise TrustError(f"root v{version} is not kept in {self.dir}; publish to the destination once to fetch it")
        return path.read_bytes()

    def ledger(self) -> Ledger:
        path = self.dir / "ledger.json"
        if not path.is_file():
            return Ledger(self.destination)
        try:
            data = json.loads(path.read_bytes())
        except ValueError as e:
            raise TrustError(f"the ledger {path} is not JSON ({e}); restore it from a backup or a team export") from e
        return Ledger.from_dict(data, str(path))

    def save_ledger(self, ledger: Ledger) -> None:
        self._write("ledger.json", json.dumps(ledger.to_dict(), indent=1, sort_keys=True).encode())

    def pending(self) -> bytes | None:
        path = self.dir / "pending.targets.json"
        return path.read_bytes() if path.is_file() else None

    def set_pending(self, targets_bytes: bytes | None) -> None:
        if targets_bytes is None:
            (self.dir / "pending.targets.json").unlink(missing_ok=True)
        else:
            self._write("pending.targets.json", targets_bytes)

    def _write(self, name: str, data: bytes) -> None:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, data, mode=0o600)


def destination_slug(destination: str) -> str:
    """A directory name for a destination: readable, and unique through a short hash."""
    readable = re.sub(r"[^A-Za-z0-9.-]+", "-", destination.split("://", 1)[-1]).strip("-")[:60]
    return f"{readable}-{sha256_bytes(destination.encode())[:10]}"


def repo_destination(repo_dir: Path) -> str:
    """The name of a local repository destination: its absolute path."""
    return str(repo_dir.resolve())


def server_destination(url: str) -> str:
    """The canonical name of a server destination (scheme and host lower-cased, no trailing slash)."""
    scheme, sep, rest = url.strip().rstrip("/").partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower()}{slash}{path}" if sep else url.strip().rstrip("/")


# --- the root -------------------------------------------------------------------------------------------


def verify_root_from_pin(
    pinned: bytes, current: bytes, fetch_root: Callable[[int], bytes], destination: str
) -> list[bytes]:
    """Walk the destination's roots from the pinned one to ``current``; returns the newer roots, oldest first.

    Each version must be signed by a threshold of the previous root's keys and of its own. A root
    that does not verify, or is older than the pinned one, or has the pinned version with other
    content, is an :class:`UntrustedRecordError` saying what differs.
    """
    trusted = parse_metadata(pinned, Root, "the pinned root")
    served = parse_metadata(current, Root, f"the root {destination} serves")
    version = served.signed.version
    if version < trusted.signed.version:
        raise UntrustedRecordError(
            f"{destination} serves root v{version}, older than v{trusted.signed.version} which this "
            "workstation pinned: a rolled-back repository; nothing was signed"
        )
    if version == trusted.signed.version and signed_sha256(served) != signed_sha256(trusted):
        raise UntrustedRecordError(_root_differs(destination, pinned, current, "is not the pinned root"))
    chain: list[bytes] = []
    previous, previous_bytes = trusted.signed, pinned
    for number in range(trusted.signed.version + 1, version + 1):
        data = current if number == version else fetch_root(number)
        try:
            md = parse_metadata(data, Root, f"root v{number} of {destination}")
            verify_root_chain(previous, md, f"root v{number} of {destination}")
        except TrustError as e:  # bad signature, version gap, unreadable
            why = f"does not verify ({e})"
            raise UntrustedRecordError(_root_differs(destination, previous_bytes, data, why)) from e
        chain.append(data)
        previous, previous_bytes = md.signed, data
    return chain


def verify_first_root(first: bytes, own_root_key: Key, destination: str) -> None:
    """Trust on first use, but only of a root this workstation's root key signed: ``1.root.json``
    must be version 1, signed by a threshold of its own root keys, and by ``own_root_key``."""
    md = parse_metadata(first, Root, f"root v1 of {destination}")
    try:
        verify_root_chain(None, md, f"root v1 of {destination}")
        signature = md.signatures.get(own_root_key.keyid)
        if signature is None or own_root_key.keyid not in md.signed.roles["root"].keyids:
            raise BadSignatureError(f"this workstation's root key {own_root_key.keyid[:12]} did not sign it")
        own_root_key.verify_signature(signature, md.signed_bytes)
    except EdgeFleetError as e:
        raise UntrustedRecordError(
            f"root v1 of {destination} is not a root this workstation signed ({e}); nothing was signed. "
            "If a teammate set this server up, import their ledger: edgefleet-convert ledger import FILE"
        ) from e
    except Exception as e:  # securesystemslib's UnverifiedSignatureError and friends
        raise UntrustedRecordError(
            f"root v1 of {destination} carries an invalid signature of this workstation's root key ({e})"
        ) from e


def _root_differs(destination: str, trusted: bytes, other: bytes, why: str) -> str:
    try:
        difference = describe_root_difference(trusted, other)
    except TrustError:
        difference = "it is not a readable root"
    return f"the root {destination} serves {why}: {difference}; nothing was signed"


# --- the targets ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerChange:
    """What a targets version signed elsewhere (a teammate's workstation) changed since the ledger."""

    version: int
    added: list[str]
    removed: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "added": self.added, "removed": self.removed}


@dataclass
class Reconciled:
    """The ledger brought up to the server's current targets version, and what came from elsewhere."""

    ledger: Ledger
    from_server: ServerChange | None = None


def reconcile(ledger: Ledger, server_targets: bytes | None, root_bytes: bytes, pending: bytes | None) -> Reconciled:
    """Check the server's current targets against the ledger (rules in the module docstring)."""
    root = parse_metadata(root_bytes, Root, "the verified root").signed
    if server_targets is None:
        if ledger.targets_version:
            raise UntrustedRecordError(
                f"{ledger.destination} serves no targets, but this workstation signed v{ledger.targets_version}: "
                "a rolled-back or replaced repository; nothing was signed"
            )
        return Reconciled(ledger)
    md = parse_metadata(server_targets, Targets, f"the targets {ledger.destination} serves")
    served, version = md.signed, md.signed.version
    _require_release_signature(root, md, ledger)
    if version < ledger.targets_version:
        raise UntrustedRecordError(
            f"{ledger.destination} serves targets v{version}, older than v{ledger.targets_version} which this "
            "workstation signed: a replayed or rolled-back repository; nothing was signed"
        )
    if version == ledger.targets_version:
        _require_same_as_ledger(ledger, md)
        return Reconciled(ledger)
    ours = pending is not None and _same_signed(pending, md)
    before = set(ledger.targets)
    after = dataclasses.replace(ledger, targets=dict(ledger.targets), history=list(ledger.history))
    after.record(version, signed_sha256(md), served.targets, "signed here" if ours else "verified on the server")
    after.floors = floors_of(served.targets)  # a floor signed elsewhere stays
    if ours:
        return Reconciled(after)
    change = ServerChange(version, sorted(set(served.targets) - before), sorted(before - set(served.targets)))
    return Reconciled(after, change)


def _require_release_signature(root: Root, md: Metadata[Targets], ledger: Ledger) -> None:
    version = md.signed.version
    try:
        verify_signatures(root, "targets", md, f"targets v{version}")
    except BadSignatureError as e:
        listed, ours = set(md.signed.targets), set(ledger.targets)
        unknown, dropped = sorted(listed - ours), sorted(ours - listed)
        shown = "".join(f"; it {verb} {len(paths)} target(s) this workstation {what}: {_sample(paths)}"
                        for verb, what, paths in (("lists", "never signed", unknown), ("drops", "signed", dropped))
                        if paths)  # fmt: skip
        raise UntrustedRecordError(
            f"the targets v{version} that {ledger.destination} serves are not signed by the release key of root "
            f"v{root.version}{shown}; nothing was signed"
        ) from e


def _require_same_as_ledger(ledger: Ledger, md: Metadata[Targets]) -> None:
    if ledger.signed_sha256 == signed_sha256(md):
        return
    listed = {path: info.to_dict() for path, info in md.signed.targets.items()}
    ours = {path: entry_info(entry) for path, entry in ledger.targets.items()}
    extra = sorted(set(listed) - set(ours))
    missing = sorted(set(ours) - set(listed))
    changed = sorted(p for p in set(ours) & set(listed) if ours[p] != listed[p])
    parts = [f"{what}: {_sample(paths)}" for what, paths in
             (("not in the ledger", extra), ("missing", missing), ("changed", changed)) if paths]  # fmt: skip
    raise UntrustedRecordError(
        f"the targets v{md.signed.version} that {ledger.destination} serves differ from the v"
        f"{ledger.targets_version} this workstation signed ({'; '.join(parts) or 'other fields'}); nothing was signed"
    )


def _same_signed(data: bytes, md: Metadata[Targets]) -> bool:
    try:
        return signed_sha256(parse_metadata(data, Targets, "pending targets")) == signed_sha256(md)
    except TrustError:
        return False


def _sample(paths: list[str]) -> str:
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(paths[:_SHOWN]) + more


# --- floors ------------------------------------------------------------------------------------------------


def floors_of(listed: Mapping[str, TargetFile]) -> dict[str, int]:
    """The per-model floors a signed targets list carries (``custom.edgefleet.min_version``)."""
    floors: dict[str, int] = {}
    for info in listed.values():
        edgefleet = info.custom.get("edgefleet") if isinstance(info.custom, dict) else None
        if isinstance(edgefleet, dict) and isinstance(edgefleet.get("min_version"), int) and "name" in edgefleet:
            floors[str(edgefleet["name"])] = int(edgefleet["min_version"])
    return floors


def stamp_floors(listed: Mapping[str, TargetFile], floors: Mapping[str, int]) -> dict[str, TargetFile]:
    """Every target of a model with a floor carries ``custom.edgefleet.min_version`` (devices enforce it);
    a model without a floor carries none. Returns new target infos (the inputs are not changed)."""
    out = {}
    for path, info in listed.items():
        custom = info.custom if isinstance(info.unrecognized_fields.get("custom"), dict) else None
        edgefleet = dict(custom.get("edgefleet", {})) if isinstance(custom, dict) else None
        if edgefleet is None or "name" not in edgefleet:
            out[path] = info
            continue
        floor = floors.get(str(edgefleet["name"]))
        if floor is None:
            edgefleet.pop("min_version", None)
        else:
            edgefleet["min_version"] = floor
        data = info.to_dict()
        data["custom"] = {**(custom or {}), "edgefleet": edgefleet}
        out[path] = TargetFile.from_dict(data, path)
    return out


# --- team export / import ---------------------------------------------------------------------------------


def export_ledger(store: TrustStore, signer: Signer, roots: list[bytes]) -> bytes:
    """The ledger and the root chain, signed by the targets key, as one JSON file for a teammate."""
    signed = {"_type": EXPORT_TYPE, "exported_at": _now(), "ledger": store.ledger().to_dict(),
              "roots": [json.loads(r) for r in roots]}  # fmt: skip
    signature = signer.sign(canonical_json(signed))
    return json.dumps({"signed": signed, "signatures": [signature.to_dict()]}, indent=1).encode()


@dataclass
class ImportedLedger:
    """A verified team export: the destination, its roots (oldest first) and the ledger."""

    ledger: Ledger
    roots: list[bytes]


def read_export(data: bytes, trusted_targets_keys: list[Key]) -> ImportedLedger:
    """Parse a ledger export and check it is signed by one of ``trusted_targets_keys``."""
    try:
        envelope = json.loads(data)
        signed, signatures = envelope["signed"], envelope["signatures"]
        if signed.get("_type") != EXPORT_TYPE:
            raise ValueError(f"_type is {signed.get('_type')!r}, not {EXPORT_TYPE}")
        roots = [json.dumps(r).encode() for r in signed["roots"]]
        ledger = Ledger.from_dict(signed["ledger"], "in the export")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"not an edgefleet ledger export ({e})") from e
    payload = canonical_json(signed)
    for raw in signatures:
        for key in trusted_targets_keys:
            if _verifies(key, raw, payload):
                return ImportedLedger(ledger, roots)
    raise UntrustedRecordError("the ledger export is not signed by a targets key this workstation trusts")


def _verifies(key: Key, raw: Any, payload: bytes) -> bool:
    try:
        signature = Signature.from_dict(dict(raw))
        if signature.keyid != key.keyid:
            return False
        key.verify_signature(signature, payload)
    except Exception:  # malformed or wrong signature: not this key's
        return False
    return True


__all__ = [
    "ImportedLedger",
    "Ledger",
    "Reconciled",
    "ServerChange",
    "TrustStore",
    "destination_slug",
    "export_ledger",
    "floors_of",
    "read_export",
    "reconcile",
    "repo_destination",
    "server_destination",
    "signed_sha256",
    "stamp_floors",
    "verify_first_root",
    "verify_root_from_pin",
]

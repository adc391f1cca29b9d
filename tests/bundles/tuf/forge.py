"""What an attacker who owns the fleet server (and so the online snapshot/timestamp keys) can sign.

Tests use these to show that devices still refuse what the offline keys did not approve.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from tests.bundles.tuf.conftest import Repo

SERIALIZER = JSONSerializer(compact=True)


def later(days: float = 1) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=days)


def meta_file(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})


def read_md(repo: Repo, name: str) -> Metadata:  # type: ignore[type-arg]
    return Metadata.from_bytes((repo.local.repository.metadata_dir / name).read_bytes())


def sign_timestamp(
    repo: Repo,
    snapshot_meta: MetaFile,
    *,
    version: int | None = None,
    expires: datetime | None = None,
    signer: Signer | None = None,
) -> bytes:
    """Write a timestamp.json signed with the online timestamp key (or ``signer``)."""
    current = read_md(repo, "timestamp.json").signed
    ts = Metadata(
        Timestamp(version=version or current.version + 1, expires=expires or later(), snapshot_meta=snapshot_meta)
    )
    ts.sign(signer or repo.local.signer("timestamp"))
    data = ts.to_bytes(SERIALIZER)
    (repo.local.repository.metadata_dir / "timestamp.json").write_bytes(data)
    return data


def forge_targets(repo: Repo, targets: dict[str, bytes], signer: Signer, expires_days: float = 30) -> None:
    """Publish targets signed by ``signer`` with valid online snapshot and timestamp signatures."""
    md_dir = repo.local.repository.metadata_dir
    current = Metadata.from_bytes(repo.local.repository.current_targets())
    tmd = Metadata(
        Targets(
            version=current.signed.version + 1,
            expires=later(expires_days),
            targets={p: TargetFile.from_data(p, d, ["sha256"]) for p, d in targets.items()},
        )
    )
    tmd.sign(signer)
    tdata = tmd.to_bytes(SERIALIZER)
    (md_dir / f"{tmd.signed.version}.targets.json").write_bytes(tdata)
    snap_version = read_md(repo, "timestamp.json").signed.snapshot_meta.version + 1
    snap = Metadata(
        Snapshot(version=snap_version, expires=later(7), meta={"targets.json": meta_file(tmd.signed.version, tdata)})
    )
    snap.sign(repo.local.signer("snapshot"))
    sdata = snap.to_bytes(SERIALIZER)
    (md_dir / f"{snap_version}.snapshot.json").write_bytes(sdata)
    sign_timestamp(repo, meta_file(snap_version, sdata))


def attacker_key() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()

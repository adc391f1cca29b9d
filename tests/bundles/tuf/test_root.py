"""Root metadata: version 1 self-signed, rotations signed by a threshold of old and new root keys."""

from __future__ import annotations

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from bundles.errors import BadSignatureError, ConfigError, VersionConflictError
from bundles.tuf.root import make_root, next_root, role_keys, verify_root


def keys(n: int) -> list[CryptoSigner]:
    return [CryptoSigner.generate_ed25519() for _ in range(n)]


def test_first_root_is_self_signed_with_consistent_snapshots_and_one_key_per_role() -> None:
    root_key, targets, snapshot, timestamp = keys(4)
    data = make_root([root_key], [targets], snapshot, timestamp, expires_days=365)
    md = verify_root(data)
    assert md.signed.version == 1 and md.signed.consistent_snapshot
    assert [k.keyid for k in role_keys(data, "targets")] == [targets.public_key.keyid]
    assert [k.keyid for k in role_keys(data, "timestamp")] == [timestamp.public_key.keyid]


def test_rotation_signed_by_old_and_new_root_keys_is_accepted() -> None:
    old_root, new_root, targets, snapshot, timestamp, new_snapshot = keys(6)
    v1 = make_root([old_root], [targets], snapshot, timestamp)
    v2 = next_root(v1, [old_root], root_signers=[new_root], snapshot_key=new_snapshot)
    md = verify_root(v2, v1)
    assert md.signed.version == 2
    assert set(md.signatures) == {old_root.public_key.keyid, new_root.public_key.keyid}
    assert [k.keyid for k in role_keys(v2, "snapshot")] == [new_snapshot.public_key.keyid]
    assert [k.keyid for k in role_keys(v2, "targets")] == [targets.public_key.keyid]  # unchanged roles kept


def test_rotation_signed_only_by_the_new_keys_is_refused() -> None:
    old_root, new_root, targets, snapshot, timestamp = keys(5)
    v1 = make_root([old_root], [targets], snapshot, timestamp)
    v2 = make_root([new_root], [targets], snapshot, timestamp, version=2)
    with pytest.raises(BadSignatureError, match="checked against the previous root"):
        verify_root(v2, v1)


def test_rotation_signed_only_by_the_old_keys_is_refused() -> None:
    old_root, new_root, targets, snapshot, timestamp = keys(5)
    v1 = make_root([old_root], [targets], snapshot, timestamp)
    v2 = next_root(v1, [old_root], root_signers=[new_root])
    md = Metadata.from_bytes(v2)
    del md.signatures[new_root.public_key.keyid]
    with pytest.raises(BadSignatureError, match="checked against its own keys"):
        verify_root(md.to_bytes(), v1)


def test_rotation_that_skips_a_version_is_refused() -> None:
    root_key, targets, snapshot, timestamp = keys(4)
    v1 = make_root([root_key], [targets], snapshot, timestamp)
    v3 = make_root([root_key], [targets], snapshot, timestamp, version=3)
    with pytest.raises(VersionConflictError, match="version 3, expected 2"):
        verify_root(v3, v1)


def test_root_threshold_two_of_three_needs_two_signatures() -> None:
    a, b, c, targets, snapshot, timestamp = keys(6)
    v1 = make_root([a, b, c], [targets], snapshot, timestamp, thresholds={"root": 2})
    verify_root(v1)
    md = Metadata.from_bytes(v1)
    md.signatures = {a.public_key.keyid: md.signatures[a.public_key.keyid]}
    with pytest.raises(BadSignatureError, match="signed by 1/2"):
        verify_root(md.to_bytes())
    with pytest.raises(ConfigError, match="threshold"):
        make_root([a], [targets], snapshot, timestamp, thresholds={"root": 2})

"""Publications: what the workstation signs and packs, and the paths it will accept."""

from __future__ import annotations

import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from bundles.errors import BadSignatureError, ConfigError, TrustError
from bundles.tuf.publication import build_targets, edgefleet_custom, make_publication, validate_target_path
from bundles.tuf.repository import TufRepository
from bundles.tuf.root import make_root


@pytest.fixture()
def keys() -> dict[str, CryptoSigner]:
    return {role: CryptoSigner.generate_ed25519() for role in ("root", "targets", "snapshot", "timestamp")}


@pytest.fixture()
def root(keys: dict[str, CryptoSigner]) -> bytes:
    return make_root([keys["root"]], [keys["targets"]], keys["snapshot"], keys["timestamp"])


def test_publication_holds_the_signed_next_version_and_the_files(
    tmp_path: Path, keys: dict[str, CryptoSigner], root: bytes
) -> None:
    model = tmp_path / "model.tar.gz"
    model.write_bytes(b"weights")
    out = make_publication(None, root, {"digits/4/onnx-fp16.tar.gz": model}, keys["targets"], tmp_path / "p.tar.gz")
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["targets.json", "targets/digits/4/onnx-fp16.tar.gz"]
        targets = Metadata[Targets].from_bytes(tar.extractfile("targets.json").read())  # type: ignore[union-attr]
    assert targets.signed.version == 1
    info = targets.signed.targets["digits/4/onnx-fp16.tar.gz"]
    assert info.length == 7 and info.custom["edgefleet"]["variant"] == "onnx-fp16"
    second = build_targets(targets.to_bytes(), root, {}, keys["targets"])
    assert Metadata[Targets].from_bytes(second).signed.version == 2  # a re-sign without files keeps the list
    assert list(Metadata[Targets].from_bytes(second).signed.targets) == ["digits/4/onnx-fp16.tar.gz"]


def test_current_targets_not_signed_by_the_release_key_are_not_built_upon(
    tmp_path: Path, keys: dict[str, CryptoSigner], root: bytes
) -> None:
    fake = Metadata(Targets(version=7))
    fake.sign(keys["snapshot"])
    with pytest.raises(BadSignatureError, match="current targets v7"):
        build_targets(fake.to_bytes(JSONSerializer()), root, {}, keys["targets"])


def test_custom_fields_are_derived_from_bundle_paths_or_given() -> None:
    assert edgefleet_custom("digits/3/manifest.json") == {
        "edgefleet": {"kind": "manifest", "name": "digits", "version": 3, "variant": None}
    }
    assert edgefleet_custom("digits/3/tflite-int8.tar.gz") == {
        "edgefleet": {"kind": "variant", "name": "digits", "version": 3, "variant": "tflite-int8"}
    }
    assert edgefleet_custom("docs/readme.txt") is None
    assert edgefleet_custom("digits/latest/manifest.json") is None


@pytest.mark.parametrize("path", ["", "/abs/x", "a/../b", "a//b", "./a", "a/b\\c", "a/b c", "a/\x00", "x" * 513])
def test_unsafe_target_paths_are_refused(path: str) -> None:
    with pytest.raises(ConfigError, match="unsafe target path"):
        validate_target_path(path)


def test_signed_targets_listing_an_unsafe_path_are_refused_by_the_server(
    tmp_path: Path, keys: dict[str, CryptoSigner], root: bytes
) -> None:
    repo = TufRepository(tmp_path / "repo")
    repo.rotate_root(root)
    later = datetime.now(timezone.utc) + timedelta(days=1)
    evil = Metadata(Targets(version=1, expires=later, targets={"../x": TargetFile.from_data("../x", b"x")}))
    evil.sign(keys["targets"])  # even the real release key cannot name a path outside the repository
    with pytest.raises(TrustError, match="unsafe target path"):
        repo.accept_targets(evil.to_bytes(JSONSerializer()), {}, keys["snapshot"], keys["timestamp"])


def test_signed_targets_with_delegations_are_refused_by_the_server(
    tmp_path: Path, keys: dict[str, CryptoSigner], root: bytes
) -> None:
    from tuf.api.metadata import DelegatedRole, Delegations

    repo = TufRepository(tmp_path / "repo")
    repo.rotate_root(root)
    role = DelegatedRole("team", [keys["snapshot"].public_key.keyid], 1, False, paths=["*"])
    delegations = Delegations({keys["snapshot"].public_key.keyid: keys["snapshot"].public_key}, {"team": role})
    later = datetime.now(timezone.utc) + timedelta(days=1)
    md = Metadata(Targets(version=1, expires=later, delegations=delegations))
    md.sign(keys["targets"])
    with pytest.raises(TrustError, match="delegate"):
        repo.accept_targets(md.to_bytes(JSONSerializer()), {}, keys["snapshot"], keys["timestamp"])

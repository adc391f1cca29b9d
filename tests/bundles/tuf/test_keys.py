"""Key files: Ed25519 PKCS#8 PEM, mode 0600, written atomically, never leaked in text."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from bundles.errors import KeyFileError
from bundles.tuf.keys import (
    generate_key,
    key_from_dict,
    key_to_dict,
    load_signer,
    public_key,
    public_key_path,
)


def private_pem(path: Path) -> bytes:
    return path.read_bytes()


def test_generated_key_is_an_owner_only_pkcs8_pem_that_loads_and_signs(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "targets.key"
    signer = generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_signer(path)
    assert loaded.public_key == signer.public_key
    signature = loaded.sign(b"payload")
    signer.public_key.verify_signature(signature, b"payload")
    assert sorted(p.name for p in path.parent.iterdir()) == ["targets.key", "targets.key.pub.json"]


def test_key_file_readable_by_group_or_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    generate_key(path)
    for mode in (0o644, 0o640, 0o604):
        os.chmod(path, mode)
        with pytest.raises(KeyFileError, match=f"mode {mode:04o}; it must be 0600"):
            load_signer(path)


def test_existing_key_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    first = generate_key(path)
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key(path)
    assert load_signer(path).public_key == first.public_key
    assert generate_key(path, overwrite=True).public_key != first.public_key


def test_private_key_material_never_appears_in_repr_logs_or_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "snapshot.key"
    signer = generate_key(path)
    pem = private_pem(path)
    body = b"".join(pem.splitlines()[1:-1]).decode()
    texts = [repr(signer), str(signer), repr(load_signer(path)), caplog.text]
    broken = tmp_path / "broken.key"
    broken.write_bytes(pem[:60] + b"garbage" + pem[60:])
    os.chmod(broken, 0o600)
    with pytest.raises(KeyFileError) as failure:
        load_signer(broken)
    texts.append(str(failure.value))
    assert failure.value.__cause__ is None
    assert all(body[:20] not in text and body[-20:] not in text for text in texts)


def test_missing_or_non_ed25519_key_files_are_key_file_errors(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(KeyFileError, match="cannot read"):
        load_signer(tmp_path / "nope.key")
    ecdsa = tmp_path / "ecdsa.key"
    ecdsa.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(ecdsa, 0o600)
    with pytest.raises(KeyFileError, match="expected an Ed25519 key"):
        load_signer(ecdsa)


def test_public_key_round_trips_through_its_dict_and_pub_file(tmp_path: Path) -> None:
    path = tmp_path / "timestamp.key"
    signer = generate_key(path)
    as_dict = key_to_dict(signer)
    assert set(as_dict) == {"keyid", "keytype", "scheme", "keyval"}
    assert as_dict["keytype"] == "ed25519" and set(as_dict["keyval"]) == {"public"}
    assert key_from_dict(as_dict) == signer.public_key
    without_id = {k: v for k, v in as_dict.items() if k != "keyid"}
    assert key_from_dict(without_id).keyid == signer.public_key.keyid
    assert public_key(public_key_path(path)) == signer.public_key
    assert public_key(path) == signer.public_key == public_key(signer)
    with pytest.raises(KeyFileError):
        key_from_dict({"keyid": "x", "keytype": "ed25519"})


def test_an_interrupted_write_leaves_no_key_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        generate_key(tmp_path / "root.key")
    assert list(tmp_path.iterdir()) == []

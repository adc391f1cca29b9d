"""The key-ceremony commands: a timestamp-key rotation done from the shell, followed by a device."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from bundles.tuf.cli import main
from bundles.tuf.client import TufClient
from tests.bundles.tuf.conftest import VARIANT, Repo


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_timestamp_key_rotation_from_the_shell_is_followed_by_devices(
    repo: Repo, make_client: Callable[..., TufClient], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_client().refresh()
    new_key = tmp_path / "server" / "timestamp.new.key"
    made = run(capsys, "keygen", str(new_key))
    assert made["public_key"]["keytype"] == "ed25519"  # type: ignore[index]
    keys_dir = repo.local.keys_dir
    out = tmp_path / "2.root.json"
    rotated = run(
        capsys, "rotate-root", "--root", str(repo.path / "metadata" / "root.json"),
        "--root-key", str(keys_dir / "root.key"), "--timestamp-key", f"{new_key}.pub.json", "--out", str(out),
    )  # fmt: skip
    assert rotated["version"] == 2
    assert rotated["roles"]["timestamp"]["keyids"] == [made["public_key"]["keyid"]]  # type: ignore[index]
    os.replace(new_key, keys_dir / "timestamp.key")  # the server puts the new key in place, then installs
    repo.local.repository.rotate_root(out.read_bytes(), repo.local.signer("snapshot"), repo.local.signer("timestamp"))
    client = make_client()
    assert client.download(VARIANT).is_file()
    assert client.trusted_root_version() == 2
    assert run(capsys, "show", str(out))["version"] == 2


def test_errors_are_one_line_on_stderr_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k.key"
    assert main(["keygen", str(key)]) == 0
    key.chmod(0o644)
    status = main(["rotate-root", "--root", str(key), "--root-key", str(key), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "must be 0600" in err

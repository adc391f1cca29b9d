"""Fixtures: a real TUF repository on disk, served by a real HTTP server on loopback."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bundles.tuf.client import TufClient
from bundles.tuf.repository import LocalRepository
from bundles.tuf.testing import FileServer

MANIFEST = "digits/1/manifest.json"
VARIANT = "digits/1/onnx-fp32.tar.gz"
VARIANT_BYTES = 300_000


@dataclass
class Repo:
    """A local repository with one published bundle (a manifest and a variant file)."""

    local: LocalRepository
    files_dir: Path

    @property
    def path(self) -> Path:
        return self.local.repository.root_dir

    def root(self) -> bytes:
        data = self.local.repository.trusted_root()
        assert data is not None
        return data

    def write_file(self, name: str, data: bytes) -> Path:
        path = self.files_dir / name
        path.write_bytes(data)
        return path

    def publish(self, files: dict[str, bytes]) -> list[str]:
        local = {target: self.write_file(target.replace("/", "_"), data) for target, data in files.items()}
        return self.local.publish(local)


@pytest.fixture()
def repo(tmp_path: Path) -> Repo:
    files = tmp_path / "files"
    files.mkdir()
    r = Repo(LocalRepository.create(tmp_path / "repo"), files)
    r.publish({MANIFEST: b'{"name": "digits", "version": 1}', VARIANT: os.urandom(VARIANT_BYTES)})
    return r


@pytest.fixture()
def server(repo: Repo) -> Iterator[FileServer]:
    with FileServer.for_repository(repo.path) as s:
        yield s


@pytest.fixture()
def make_client(tmp_path: Path, server: FileServer, repo: Repo) -> Iterator[Callable[..., TufClient]]:
    """Build clients that share one device state directory (as one device across restarts)."""
    clients: list[TufClient] = []

    def make(name: str = "device", **kwargs: object) -> TufClient:
        device = tmp_path / name
        kwargs.setdefault("trusted_root", repo.root())
        client = TufClient(
            device / "metadata",
            device / "targets",
            server.url("/tuf/metadata/"),
            server.url("/tuf/targets/"),
            timeout_s=5.0,
            **kwargs,  # type: ignore[arg-type]
        )
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()

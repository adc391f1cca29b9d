"""Bundles for the cloud endpoint, verified the way a device verifies them.

The endpoint reads the server's own TUF repository, but not by trusting its files: it runs the
device's TUF client (:class:`bundles.tuf.client.TufClient`, ``tuf.ngclient`` underneath) against it,
from a pinned root, so every signature, version, expiry, length and hash is checked before a byte
is used, and the cloud answers with exactly the bytes a rollout ships. The only difference from a
device is the transport: :class:`StorageTransport` hands the client the files of the artifact store
(:class:`fleet_server.storage.Storage`) instead of going through HTTP.

Flow of :meth:`VerifiedBundles.open`: refresh the trusted metadata (at most every few seconds, so a
new publication is seen) -> the signed ``<name>/<version>/manifest.json`` -> the variant this host
runs best (:func:`bundles.selection.select_variant`) -> its signed archive -> unpacked and checked
against the manifest (:func:`bundles.archive.open_variant`) in a per-process cache directory. One
TUF client per process, behind a lock (ngclient's rule: one updater per metadata directory).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bundles.archive import MANIFEST_NAME, open_variant
from bundles.errors import ConfigError, EdgeFleetError, MixAndMatchError, UnknownTargetError
from bundles.manifest import Manifest
from bundles.selection import DeviceCapabilities, probe_capabilities, select_variant
from fleet_server.errors import NotFoundError
from fleet_server.storage import Storage

BASE_URL = "http://tuf.storage"
REFRESH_EVERY_S = 5.0


class ModelNotFoundError(NotFoundError):
    """No such model, or no such version of it (404)."""


class StorageTransport(httpx.BaseTransport):
    """An httpx transport that answers ``GET <BASE_URL>/<key>`` from the artifact store (404 when absent)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        key = request.url.path.lstrip("/")
        try:
            size = self.storage.size(key)
        except NotFoundError:
            return httpx.Response(404, request=request)
        body = self.storage.read_range(key, 0, size - 1) if size else iter(())
        return httpx.Response(200, headers={"Content-Length": str(size)}, content=_chunks(body), request=request)


def _chunks(body: Iterator[bytes]) -> Iterator[bytes]:
    yield from body


@dataclass(frozen=True)
class OpenedBundle:
    """A verified bundle unpacked for one variant: load it with ``Predictor.load(manifest, directory, variant)``."""

    manifest: Manifest
    variant: str
    directory: Path


class VerifiedBundles:
    """Verified access to the bundles of the server's TUF repository (module docstring)."""

    def __init__(
        self, storage: Storage, trusted_root: Path, cache_dir: Path, caps: DeviceCapabilities | None = None
    ) -> None:
        from bundles.tuf.client import TufClient

        if not trusted_root.is_file():
            raise ConfigError(f"no trusted TUF root at {trusted_root}: install the root first ('edgefleet-server tuf')")
        self.dir = cache_dir / f"worker-{os.getpid()}"
        self.caps = caps or probe_capabilities(cache_dir if cache_dir.exists() else ".")
        self._http = httpx.Client(transport=StorageTransport(storage))
        self.client = TufClient(
            self.dir / "metadata", self.dir / "targets", f"{BASE_URL}/metadata/", f"{BASE_URL}/targets/",
            trusted_root=trusted_root.read_bytes(), http=self._http,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._refreshed_at = -1e9

    def open(self, name: str, version: int) -> OpenedBundle:
        """The verified bundle ``name@version``, unpacked for this host's best variant."""
        with self._lock:
            self._refresh()
            target = f"{name}/{version}/manifest.json"
            try:
                raw = self.client.download(target).read_bytes()
            except UnknownTargetError as e:
                raise ModelNotFoundError(f"{name}@{version} is not published in the signed repository") from e
            manifest = Manifest.from_bytes(raw)
            if (manifest.name, manifest.version) != (name, version):
                raise MixAndMatchError(f"target {target} holds {manifest.ref}, not {name}@{version}")
            variant = select_variant(manifest, self.caps)
            directory = self.dir / "bundles" / name / str(version) / variant.id
            if not _holds(directory, raw):
                archive = self.client.download(f"{name}/{version}/{variant.id}.tar.gz")
                open_variant(archive, directory, manifest, variant.id)
            return OpenedBundle(manifest, variant.id, directory)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._refreshed_at >= REFRESH_EVERY_S:
            self.client.refresh()
            self._refreshed_at = now

    def close(self, remove: bool = True) -> None:
        """Close the client; ``remove`` deletes this process's cache directory."""
        self.client.close()
        self._http.close()
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)


def _holds(directory: Path, manifest_bytes: bytes) -> bool:
    """Whether ``directory`` was unpacked from this very manifest (the Predictor re-checks the files)."""
    path = directory / MANIFEST_NAME
    try:
        return Manifest.from_bytes(path.read_bytes()).to_bytes() == Manifest.from_bytes(manifest_bytes).to_bytes()
    except (OSError, EdgeFleetError):
        return False

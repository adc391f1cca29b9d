"""The TUF repository the server hosts, and its online keys.

The repository logic is ``bundles.tuf.repository.TufRepository``; this module only adds what a
server needs around it: where the repository and the online snapshot/timestamp keys live, a lock
so that a publication and a timestamp refresh never write at the same time (a thread lock inside a
process, an ``flock`` across processes), and the background loop that re-signs timestamp (and
snapshot) before they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bundles.errors import ConfigError, EdgeFleetError
from fleet_server.settings import Settings
from fleet_server.storage import LocalStorage

log = logging.getLogger("fleet_server.tuf")

SNAPSHOT_KEY_FILE = "snapshot.pem"
TIMESTAMP_KEY_FILE = "timestamp.pem"


class TufHost:
    """The hosted repository directory, its online keys and the write lock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repo_dir = settings.tuf_dir
        self.keys_dir = settings.keys_dir
        self.storage = LocalStorage(self.repo_dir)
        self._lock = threading.Lock()

    def repository(self) -> Any:
        """A ``TufRepository`` over the repository directory."""
        from bundles.tuf.repository import TufRepository

        return TufRepository(self.repo_dir)

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Exclusive access to the repository for one writer, in this process and across processes."""
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        with self._lock, (self.repo_dir / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def online_signers(self) -> tuple[Any, Any]:
        """The snapshot and timestamp signers (a ``KeyFileError`` if ``init`` has not made them)."""
        from bundles.tuf.keys import load_signer

        return load_signer(self.keys_dir / SNAPSHOT_KEY_FILE), load_signer(self.keys_dir / TIMESTAMP_KEY_FILE)

    def create_online_keys(self) -> None:
        """Generate the snapshot and timestamp keys (``edgefleet-server init``); existing keys are kept."""
        from bundles.tuf.keys import generate_key

        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in (SNAPSHOT_KEY_FILE, TIMESTAMP_KEY_FILE):
            if not (self.keys_dir / name).exists():
                generate_key(self.keys_dir / name)

    def online_keys(self) -> dict[str, Any]:
        """The public online keys as TUF key dicts (what the release workstation puts in root)."""
        from bundles.tuf.keys import key_to_dict, public_key

        return {
            "snapshot": key_to_dict(public_key(self.keys_dir / SNAPSHOT_KEY_FILE)),
            "timestamp": key_to_dict(public_key(self.keys_dir / TIMESTAMP_KEY_FILE)),
        }

    def has_root(self) -> bool:
        """Whether a root has been installed (a repository can serve devices only then)."""
        return (self.repo_dir / "metadata" / "root.json").is_file()

    def trusted_root(self) -> dict[str, Any] | None:
        """The current root.json object, or None before the first root is installed."""
        return self._load_json(self.repo_dir / "metadata" / "root.json") if self.has_root() else None

    def current_targets(self) -> dict[str, Any] | None:
        """The current signed targets.json object, or None before the first root."""
        if not self.has_root():
            return None
        return self._load_json_bytes(self.repository().current_targets())

    def install_root(self, root_bytes: bytes) -> int:
        """Install root version 1 or rotate to N+1 (verified by ``TufRepository``); returns its version."""
        with self.write_lock():
            self.repository().rotate_root(root_bytes)
        root = self.trusted_root() or {}
        return int(root.get("signed", {}).get("version", 0))

    def accept_publication(self, publication_path: Path) -> list[str]:
        """Verify and apply a publication; returns the new target paths."""
        if not self.has_root():
            raise ConfigError("the server has no TUF root yet: PUT /api/v1/admin/tuf/root first")
        snapshot_signer, timestamp_signer = self.online_signers()
        with self.write_lock():
            targets: list[str] = self.repository().accept_publication(
                publication_path, snapshot_signer, timestamp_signer
            )
        return targets

    def refresh(self) -> None:
        """Re-sign timestamp (and snapshot) when they expire within a third of their lifetime."""
        if not self.has_root():
            return
        _, timestamp_signer = self.online_signers()
        with self.write_lock():
            self.repository().refresh_timestamp(timestamp_signer, self.settings.timestamp_expiry_s // 3)

    @staticmethod
    def _load_json(path: Path) -> dict[str, Any]:
        return TufHost._load_json_bytes(path.read_bytes())

    @staticmethod
    def _load_json_bytes(raw: bytes) -> dict[str, Any]:
        loaded = json.loads(raw)
        if not isinstance(loaded, dict):
            raise ConfigError("TUF metadata is not a JSON object")
        return loaded


async def refresh_loop(host: TufHost, interval_s: float) -> None:
    """Run ``host.refresh`` every ``interval_s`` until cancelled; failures are logged, never fatal."""
    while True:
        try:
            await asyncio.to_thread(host.refresh)
        except EdgeFleetError as error:
            log.warning("TUF refresh failed: %s", error)
        except Exception:
            log.exception("TUF refresh crashed")
        await asyncio.sleep(interval_s)

"""The TUF repository the server hosts, and its online keys.

The repository logic (verification, consistent snapshots, its own writer lock) is
``bundles.tuf.repository.TufRepository``; this module only adds what a server needs around it:
where the repository and the online snapshot/timestamp keys live, and the background loop that
re-signs timestamp (and snapshot) before they expire.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bundles.errors import ConfigError, EdgeFleetError
from fleet_server.errors import ConflictError
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

    def repository(self) -> Any:
        """A ``TufRepository`` over the repository directory, with the configured online expiries."""
        from bundles.tuf.common import Expiry
        from bundles.tuf.repository import TufRepository

        expiry = Expiry(timestamp=dt.timedelta(seconds=self.settings.timestamp_expiry_s),
                        snapshot=dt.timedelta(seconds=self.settings.snapshot_expiry_s))  # fmt: skip
        return TufRepository(self.repo_dir, expiry=expiry)

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

        if not self.has_online_keys():
            raise ConflictError("the server has no online TUF keys yet: run 'edgefleet-server init'")
        return {
            "snapshot": key_to_dict(public_key(self.keys_dir / SNAPSHOT_KEY_FILE)),
            "timestamp": key_to_dict(public_key(self.keys_dir / TIMESTAMP_KEY_FILE)),
        }

    def has_root(self) -> bool:
        """Whether a root has been installed (a repository can serve devices only then)."""
        return (self.repo_dir / "metadata" / "root.json").is_file()

    def has_online_keys(self) -> bool:
        """Whether ``init`` has created the snapshot and timestamp keys."""
        return all((self.keys_dir / name).is_file() for name in (SNAPSHOT_KEY_FILE, TIMESTAMP_KEY_FILE))

    def trusted_root(self) -> dict[str, Any] | None:
        """The current root.json object, or None before the first root is installed."""
        raw = self.repository().trusted_root() if self.has_root() else None
        return None if raw is None else self._load_json_bytes(raw)

    def current_targets(self) -> dict[str, Any] | None:
        """The current signed targets.json object, or None before the first publication."""
        raw = self.repository().current_targets() if self.has_root() else None
        return None if raw is None else self._load_json_bytes(raw)

    def install_root(self, root_bytes: bytes) -> int:
        """Install root version 1 or rotate to N+1 (verified by ``TufRepository``); returns its version.

        The online signers are passed along so that a rotation that changes them re-signs snapshot
        and timestamp at once.
        """
        signers = self.online_signers() if self.has_online_keys() else (None, None)
        version: int = self.repository().rotate_root(root_bytes, *signers)
        return version

    def accept_publication(self, publication_path: Path) -> list[str]:
        """Verify and apply a publication; returns the new or changed target paths."""
        from bundles.tuf.publication import PublicationLimits

        if not self.has_root():
            raise ConfigError("the server has no TUF root yet: PUT /api/v1/admin/tuf/root first")
        limits = PublicationLimits(max_total_bytes=self.settings.max_publication_bytes * 2,
                                   max_member_bytes=self.settings.max_publication_bytes * 2)  # fmt: skip
        targets: list[str] = self.repository().accept_publication(publication_path, *self.online_signers(), limits)
        return targets

    def refresh(self) -> list[str]:
        """Re-sign timestamp (and snapshot) when they expire within a quarter of their lifetime."""
        if not self.has_root() or not self.has_online_keys():
            return []
        snapshot_signer, timestamp_signer = self.online_signers()
        resigned: list[str] = self.repository().refresh_timestamp(
            timestamp_signer, self.settings.timestamp_expiry_s / 4, snapshot_signer=snapshot_signer,
            snapshot_if_expires_within_s=self.settings.snapshot_expiry_s / 4,
        )  # fmt: skip
        if resigned:
            log.info("re-signed %s", ", ".join(resigned))
        return resigned

    @staticmethod
    def _load_json(path: Path) -> dict[str, Any]:
        return TufHost._load_json_bytes(path.read_bytes())

    @staticmethod
    def _load_json_bytes(raw: bytes) -> dict[str, Any]:
        loaded = json.loads(raw)
        if not isinstance(loaded, dict):
            raise ConfigError("TUF metadata is not a JSON object")
        return loaded


async def refresh_loop(host: TufHost, interval_s: float, is_leader: Callable[[], bool] = lambda: True) -> None:
    """Run ``host.refresh`` every ``interval_s`` (when ``is_leader()``) until cancelled; failures are logged."""
    while True:
        try:
            if is_leader():
                await asyncio.to_thread(host.refresh)
        except EdgeFleetError as error:
            log.warning("TUF refresh failed: %s", error)
        except Exception:
            log.exception("TUF refresh crashed")
        await asyncio.sleep(interval_s)

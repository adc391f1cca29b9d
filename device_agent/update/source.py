"""Where signed bundles come from: the protocol the update steps use, and its TUF implementation.

A bundle is two TUF targets: ``<name>/<version>/manifest.json`` and, per variant,
``<name>/<version>/<variant_id>.tar.gz``. The device fetches the manifest, selects its variant, and
fetches only that archive. The TUF client verifies every byte against the signed metadata, caps the
download at the signed length and resumes a cut download with an HTTP Range request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class BundleSource(Protocol):
    """Verified access to signed targets."""

    def refresh(self) -> None:
        """Update the trusted metadata (timestamp, snapshot, targets)."""

    def target_length(self, target_path: str) -> int:
        """The signed length in bytes of a target."""

    def target_custom(self, target_path: str) -> dict[str, Any]:
        """The signed ``custom`` field of a target (``{}`` if it has none)."""

    def fetch(self, target_path: str) -> Path:
        """A local file holding the target's verified bytes (downloaded or cached)."""


def variant_target(manifest_target: str, variant_id: str) -> str:
    """``digits/3/manifest.json`` + ``onnx-fp32`` -> ``digits/3/onnx-fp32.tar.gz``."""
    prefix = manifest_target.rsplit("/", 1)[0]
    return f"{prefix}/{variant_id}.tar.gz"


class TufSource:
    """A :class:`BundleSource` over :class:`bundles.tuf.client.TufClient`."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def refresh(self) -> None:
        self.client.refresh()

    def target_length(self, target_path: str) -> int:
        return int(self.client.target_info(target_path).length)

    def target_custom(self, target_path: str) -> dict[str, Any]:
        custom = self.client.target_info(target_path).custom
        return dict(custom) if isinstance(custom, dict) else {}

    def fetch(self, target_path: str) -> Path:
        return Path(self.client.download(target_path))

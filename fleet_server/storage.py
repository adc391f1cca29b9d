"""A small storage interface for the files the server keeps and serves (TUF metadata and targets).

The TUF repository already lays targets out content-addressed (``targets/<dir>/<sha256>.<name>``),
so storage is keyed by relative path. :class:`LocalStorage` is the filesystem implementation; an
S3-compatible one would implement the same four methods. Paths are resolved strictly inside the
root so that a request path can never escape it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from fleet_server.errors import NotFoundError

CHUNK_BYTES = 256 * 1024


MAX_KEY_CHARS = 1024


class Storage(Protocol):
    """Read access to stored objects by relative key (what the HTTP layer needs)."""

    def size(self, key: str) -> int:
        """The object's size in bytes; :class:`NotFoundError` when absent."""

    def read_range(self, key: str, start: int, end_inclusive: int) -> Iterator[bytes]:
        """The bytes ``start..end_inclusive`` in chunks."""

    def read_bytes(self, key: str) -> bytes:
        """The whole object (for small objects such as metadata)."""

    def exists(self, key: str) -> bool:
        """Whether the object is stored."""


class LocalStorage:
    """Objects as files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, key: str) -> Path:
        """The file behind ``key``; refuses keys that leave the root (``..``, absolute paths) or that no file
        system could hold (names over 255 bytes, keys over 1,024 characters)."""
        if not key or key.startswith("/") or "\\" in key or "\x00" in key or len(key) > MAX_KEY_CHARS:
            raise NotFoundError(f"no stored object {key[:100]!r}")
        if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in key.split("/")):
            raise NotFoundError(f"no stored object {key[:100]!r}")
        root = self.root.resolve()
        try:
            path = (root / key).resolve()
        except (OSError, ValueError) as e:
            raise NotFoundError(f"no stored object {key[:100]!r}") from e
        if root not in path.parents:
            raise NotFoundError(f"no stored object {key!r}")
        return path

    def exists(self, key: str) -> bool:
        try:
            return self.path_of(key).is_file()
        except NotFoundError:
            return False

    def size(self, key: str) -> int:
        path = self.path_of(key)
        if not path.is_file():
            raise NotFoundError(f"no stored object {key!r}")
        return path.stat().st_size

    def read_bytes(self, key: str) -> bytes:
        path = self.path_of(key)
        if not path.is_file():
            raise NotFoundError(f"no stored object {key!r}")
        return path.read_bytes()

    def read_range(self, key: str, start: int, end_inclusive: int) -> Iterator[bytes]:
        remaining = end_inclusive - start + 1
        with self.path_of(key).open("rb") as handle:
            handle.seek(start)
            while remaining > 0:
                chunk = handle.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

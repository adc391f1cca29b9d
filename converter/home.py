"""The converter's state directory, ``$EDGEFLEET_HOME`` (default ``~/.edgefleet``).

Layout: ``registry.db`` (SQLite), ``keys/`` (release keys, mode 0600), ``artifacts/<name>/<version>/``
(the immutable copy of what was registered, and one ``conversions/<n>/`` directory per conversion),
``reports/<name>/<version>/`` and ``repository/`` (the default local TUF repository).

Directories that must appear whole are built under a temporary sibling and renamed into place
(:func:`publish_dir`), so an interrupted command leaves no half-written artifact behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    """Paths inside one state directory."""

    root: Path

    @classmethod
    def from_env(cls) -> Home:
        return cls(Path(os.environ.get("EDGEFLEET_HOME", "~/.edgefleet")).expanduser())

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.root / 'registry.db'}"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def repository_dir(self) -> Path:
        return self.root / "repository"

    def artifacts_dir(self, name: str, version: int) -> Path:
        return self.root / "artifacts" / name / str(version)

    def conversion_dir(self, name: str, version: int, number: int) -> Path:
        return self.artifacts_dir(name, version) / "conversions" / str(number)

    def reports_dir(self, name: str, version: int) -> Path:
        return self.root / "reports" / name / str(version)

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary directory next to ``final``; removed if the block raises, else left for :func:`publish_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def publish_dir(temp: Path, final: Path) -> None:
    """Move a fully written ``temp`` directory to ``final`` atomically (``final`` must not exist)."""
    if final.exists():
        shutil.rmtree(temp, ignore_errors=True)
        raise FileExistsError(f"{final} already exists")
    os.replace(temp, final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)

"""The converter's state directory, ``$EDGEFLEET_HOME`` (default ``~/.edgefleet``).

Layout: ``registry.db`` (SQLite), ``keys/`` (release keys, mode 0600), ``artifacts/<name>/<version>/``
(the immutable copy of what was registered, and one ``conversions/<n>/`` directory per conversion),
``reports/<name>/<version>/``, ``repository/`` (the default local TUF repository) and ``tmp/``
(private work directories of running commands).

Directories that must appear whole are built under a temporary sibling and renamed into place
(:func:`publish_dir`), so an interrupted command leaves no half-written artifact behind, and a
failed one no empty folder either (:func:`staging_dir` removes the parents it created).
Third-party tools that write temporary files into the current or the system temporary directory
(ONNX Runtime's quantiser and shape inference, onnx's external data) run inside
:func:`scratch_dir`, so nothing a conversion writes lands outside ``$EDGEFLEET_HOME``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bundles.durable import atomic_write_bytes, fsync_dir


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

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary directory next to ``final``; removed if the block raises, else left for :func:`publish_dir`.

    On failure the parent directories this call created are removed again when empty.
    """
    created = _missing_parents(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        _remove_if_empty(created)
        raise


def _missing_parents(final: Path) -> list[Path]:
    """The ancestors of ``final`` that do not exist yet, deepest first."""
    missing = []
    parent = final.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def _remove_if_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (or gone): its parents are not empty either


@contextmanager
def scratch_dir(home: Home, prefix: str) -> Iterator[Path]:
    """A private work directory under ``home/tmp`` that is also the current and the temporary directory.

    While the block runs, ``os.getcwd()``, :func:`tempfile.gettempdir` and ``TMPDIR`` (for child
    processes) all point into it; afterwards they are restored and the directory is removed (and
    ``tmp/`` too when nothing else runs). Meant for the single-threaded CLI commands.
    """
    home.tmp_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=home.tmp_dir))
    saved = (os.getcwd(), tempfile.tempdir, os.environ.get("TMPDIR"))
    try:
        os.chdir(work)
        tempfile.tempdir = str(work)
        os.environ["TMPDIR"] = str(work)
        yield work
    finally:
        os.chdir(saved[0])
        tempfile.tempdir = saved[1]
        if saved[2] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[2]
        shutil.rmtree(work, ignore_errors=True)
        _remove_if_empty([home.tmp_dir])


def publish_dir(temp: Path, final: Path) -> None:
    """Move a fully written ``temp`` directory to ``final`` atomically (``final`` must not exist)."""
    if final.exists():
        shutil.rmtree(temp, ignore_errors=True)
        raise FileExistsError(f"{final} already exists")
    os.replace(temp, final)
    fsync_dir(final.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename (:mod:`bundles.durable`)."""
    atomic_write_bytes(path, data)

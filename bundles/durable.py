"""Crash-safe writes: the one way edgefleet replaces a file that must survive a power cut.

A write goes to a temporary file in the same directory (created with its final permissions, so a
private key is never readable by others, not even for a moment), is flushed and fsynced, replaces
the target with ``os.replace`` (atomic on POSIX), and finally the directory itself is fsynced so
that the rename is on disk too. A reader therefore sees the old bytes or the new bytes, never a mix.

Used by the device agent (state files, slots, keys), the TUF repository and keys, the archive
packer and the converter's home directory. Temporary files are named ``.<name>.<random>.tmp`` so
that a start-up sweep (:func:`remove_stray_temp_files`) can recognise the leftovers of a write that
a power cut interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk (no-op where the OS cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (a staged model slot) so it survives a power cut."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` on a clean exit, all or nothing.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permissions ``mode``."""
    with atomic_file(path, mode) as handle:
        handle.write(data)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for humans and diffs)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode)


def remove_stray_temp_files(directories: Iterable[Path]) -> int:
    """Delete the temporary files of writes a power cut interrupted (``.<name>.*.tmp``) in ``directories``."""
    removed = 0
    for directory in directories:
        for path in directory.glob(f".*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


__all__ = [
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "fsync_tree",
    "remove_stray_temp_files",
]

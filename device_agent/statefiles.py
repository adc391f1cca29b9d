"""The one way the agent reads a file it persisted: validated, and self-healing when the file is damaged.

Flash wears out, power fails mid-write on hardware that lies about fsync, and people edit files by
hand. So every state file (slot pointers and markers, deployment record, failed targets, last update,
desired state, enrollment, telemetry settings) is read by :meth:`StateFiles.load` with the typed
model of :mod:`bundles.contract` that describes it:

* absent: the caller's default (a device that never wrote the file is not damaged);
* unreadable, not JSON, or not fitting the model: the file is **moved aside** to
  ``<state_dir>/quarantine/`` (never deleted: an engineer can look at it), the damage is **logged**
  naming the file, a :class:`Repair` is recorded (the agent sends each one to the server as a
  ``repair`` event and ``status`` lists them), and the caller gets the **safest state it can
  rebuild** (its ``rebuild`` callback: the other slot, the enrolled root, an empty record...).

Writes go through :func:`bundles.durable.atomic_write_json`, so a file is either its old or its new
content; what this module repairs is what a crash-safe write cannot prevent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bundles.contract import RepairEvent, parse_json, to_dict
from bundles.durable import atomic_write_json, fsync_dir
from bundles.errors import ContractError

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_STATE_FILE_BYTES = 16 * 2**20
"""No state file is legitimately this large; a bigger one is damage (and must not be read into memory)."""
MAX_QUARANTINED = 50
"""Quarantined entries kept; the oldest go first (a device must not fill its disk with its own damage)."""


@dataclass(frozen=True)
class Repair:
    """One damaged file found, set aside and replaced."""

    file: str
    reason: str
    action: str
    quarantined_as: str | None
    at: float
    model: str | None = None

    def event(self) -> dict[str, Any]:
        """The ``repair`` telemetry event (``bundles.contract.RepairEvent``)."""
        at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(self.at))
        event = RepairEvent(
            id=uuid.uuid4().hex, at=at, file=self.file, reason=self.reason[:2000], action=self.action[:2000],
            model=self.model, quarantined_as=self.quarantined_as,
        )  # fmt: skip
        data: dict[str, Any] = to_dict(event)
        return data


class StateFiles:
    """Validated reads, crash-safe writes and quarantine for the files under one ``state_dir``."""

    def __init__(self, state_dir: Path, read_only: bool = False) -> None:
        self.state_dir = state_dir
        self.read_only = read_only  # an app process or `status`: rebuild in memory, leave the disk to the daemon
        self.quarantine_dir = state_dir / "quarantine"
        self.repairs: list[Repair] = []
        self._listeners: list[Callable[[Repair], None]] = []
        self._lock = threading.Lock()

    def on_repair(self, listener: Callable[[Repair], None]) -> None:
        """Call ``listener`` for every repair from now on (and for those already made)."""
        with self._lock:
            self._listeners.append(listener)
            done = list(self.repairs)
        for repair in done:
            listener(repair)

    def load(self, path: Path, kind: Any, default: Any = None, rebuild: Callable[[], Any] | None = None,
             action: str = "", parser: Callable[[Any], Any] | None = None) -> Any:  # fmt: skip
        """The content of ``path`` as ``kind``; ``default`` if absent; rebuilt (and reported) if damaged.

        ``parser`` replaces :func:`bundles.contract.parse` for a model with its own reading rules.
        """
        try:
            raw = _read_capped(path)
        except FileNotFoundError:
            return default
        except OSError as e:
            return self._heal(path, f"unreadable: {e.strerror or e}", default, rebuild, action)
        try:
            if parser is None:
                return parse_json(kind, raw, where=self.relative(path))
            return parser(parse_json(Any, raw, where=self.relative(path)))
        except ContractError as e:
            return self._heal(path, str(e), default, rebuild, action)

    def save(self, path: Path, value: Any, mode: int = 0o644) -> None:
        """Write a contract model (or plain data) crash-safely (nothing in read-only mode)."""
        if self.read_only:
            return
        atomic_write_json(path, to_dict(value), mode)

    def remove(self, path: Path) -> None:
        """Delete ``path`` durably (no error if it is already gone)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            fsync_dir(path.parent)

    def quarantine(self, path: Path, reason: str, action: str, model: str | None = None) -> Repair:
        """Move ``path`` (a file or a directory) aside, log it and record the repair (read-only: only log)."""
        moved = None if self.read_only else self._move_aside(path)
        repair = Repair(self.relative(path), reason, action, moved, time.time(), model)
        log.error("damaged state file %s: %s; moved to %s; %s", path, reason, moved or "(could not move)", action)
        self.record(repair)
        return repair

    def missing(self, path: Path, action: str, model: str | None = None) -> Repair:
        """Record that ``path`` is missing although the rest of the state says it must exist."""
        repair = Repair(self.relative(path), "missing", action, None, time.time(), model)
        log.error("state file %s is missing; %s", path, action)
        self.record(repair)
        return repair

    def record(self, repair: Repair) -> None:
        """Remember a repair and tell the listeners (the telemetry recorder, for the server)."""
        with self._lock:
            self.repairs.append(repair)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(repair)
            except Exception as e:  # a report must never stop a repair
                log.warning("could not report the repair of %s: %s", repair.file, e)

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.state_dir))
        except ValueError:
            return str(path)

    def _heal(self, path: Path, reason: str, default: Any, rebuild: Callable[[], Any] | None, action: str) -> Any:
        """Set the damaged file aside first (a rebuild may write a fresh one in its place), then rebuild."""
        self.quarantine(path, reason, action or ("rebuilt" if rebuild is not None else "started empty"))
        return rebuild() if rebuild is not None else default

    def _move_aside(self, path: Path) -> str | None:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}-{self.relative(path).replace(os.sep, '__')}"
        target = self.quarantine_dir / name
        try:
            os.replace(path, target)
        except OSError as e:
            log.warning("cannot move %s to quarantine (%s); removing it", path, e)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        fsync_dir(path.parent)
        self._prune()
        return str(target.relative_to(self.state_dir))

    def _prune(self) -> None:
        entries = sorted(self.quarantine_dir.iterdir(), key=lambda p: p.name)
        for old in entries[: max(0, len(entries) - MAX_QUARANTINED)]:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _read_capped(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_STATE_FILE_BYTES + 1)
    if len(data) > MAX_STATE_FILE_BYTES:
        raise OSError(f"over {MAX_STATE_FILE_BYTES} bytes")
    return data


__all__ = ["Repair", "StateFiles"]

"""The offline buffer: telemetry items in SQLite under a disk cap, evicted by priority.

Items (events, windows, samples) are stored as zlib-compressed JSON in one table with a priority
(0 is kept longest), so a device that is offline for weeks keeps its install events and errors and
loses routine samples first. Every eviction is counted by kind and reason in ``drops``; the counts
are turned into a ``drops`` event (priority 0) when the next batch is built, so the server learns
what was lost.

Under pressure, before any window is evicted, the oldest windows are merged into one per hour (they
are sums, so no count is lost, only time resolution): ``compact`` is the merge function
(``device_agent.telemetry.windows.merge_windows``).

Uploads are idempotent: :meth:`TelemetryBuffer.next_batch` marks the items it hands out with a
batch id and returns the same batch (same id, same items) until :meth:`ack` deletes them, so a
retry after a lost answer is the same batch and the server counts it once. ``next_batch(exclude=...)``
hands out another batch while one is in flight (the uploader's probe after a 5xx), and
:meth:`strike` counts, on the batch's rows, the 5xx answers the batch got while the server was
answering others, so that the count survives a restart (the uploader drops a batch after
``MAX_STRIKES`` of them: ``device_agent.telemetry.uploader``).

Schema versions: ``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`. Changes are additive (a new
column with a default), so a file of an older agent is migrated in place at open and an older agent
still reads a newer file; a damaged file is refused at open (``PRAGMA quick_check``) and the agent
sets it aside (``device_agent.agent``).

Size accounting: the payload bytes plus :data:`ROW_OVERHEAD_BYTES` per row are kept under a budget
that leaves room in ``cap_bytes`` for the WAL (capped at 1 MiB or 1/32 of the cap), the shared-memory
file and SQLite's page overhead (:data:`PAGE_OVERHEAD`); the buffer tests check the real
file sizes. Stdlib ``sqlite3`` in WAL mode; one lock.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import threading
import uuid
import zlib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundles.errors import ConfigError
from device_agent.telemetry.windows import merge_windows

ROW_OVERHEAD_BYTES = 48
PAGE_OVERHEAD = 1.25
"""Measured: the database file holds about 1.2 bytes per accounted byte (page fill, indexes, free pages)."""
SHM_BYTES = 64 * 1024
EVICT_TO = 0.98
COMPACT_SPAN_S = 3600
"""Under pressure, windows are merged into one per hour (per model and version)."""
COMPACT_CHUNK = 240
PRIORITIES = {
    "event:install": 0,
    "event:error": 0,
    "event:drops": 0,
    "sample:error": 0,
    "event:breaker": 1,
    "event:heartbeat": 1,
    "event": 1,
    "window": 2,
    "sample:fallback": 3,
    "sample:low_confidence": 3,
    "sample:rate": 4,
}
"""Priority by ``kind:label`` (then by ``kind``); 0 is evicted last. Install events and errors first."""
MAX_PRIORITY = max(PRIORITIES.values())
COALESCED = frozenset({"event:heartbeat"})
"""Labels of which only the newest item is kept (a heartbeat replaces the previous one)."""

SCHEMA_VERSION = 1
"""0: the first schema; 1: ``items.strikes`` (5xx answers a batch got while the server answered others)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    label TEXT NOT NULL,
    priority INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    body BLOB NOT NULL,
    batch_id TEXT,
    strikes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ix_items_evict ON items (priority, seq);
CREATE INDEX IF NOT EXISTS ix_items_label ON items (label);
CREATE TABLE IF NOT EXISTS drops (label TEXT PRIMARY KEY, items INTEGER NOT NULL, size_bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (owner TEXT NOT NULL, key TEXT NOT NULL, body BLOB NOT NULL,
                                        PRIMARY KEY (owner, key));
"""


@dataclass(frozen=True)
class Batch:
    """Items handed out for one upload; the same id until acknowledged."""

    batch_id: str
    events: list[dict[str, Any]]
    windows: list[dict[str, Any]]
    samples: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "events": self.events, "windows": self.windows, "samples": self.samples}

    def __len__(self) -> int:
        return len(self.events) + len(self.windows) + len(self.samples)


def priority_of(kind: str, label: str) -> int:
    """The priority of an item (``kind`` event/window/sample, ``label`` its type or capture reason)."""
    return PRIORITIES.get(f"{kind}:{label}", PRIORITIES.get(kind, MAX_PRIORITY))


class TelemetryBuffer:
    """A capped, prioritised SQLite queue of telemetry items (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        cap_bytes: int,
        compact: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = merge_windows,
    ) -> None:
        if cap_bytes < 64 * 1024:
            raise ConfigError(f"telemetry buffer cap {cap_bytes} bytes is too small (minimum 64 KiB)")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cap_bytes = cap_bytes
        self.compact = compact
        self.compacted = 0
        self.wal_limit_bytes = min(1024 * 1024, cap_bytes // 32)
        self.budget_bytes = int((cap_bytes - self.wal_limit_bytes - SHM_BYTES) / PAGE_OVERHEAD)
        self._lock = threading.Lock()
        _make_private(self.path)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            self._configure()
            self._check_integrity()
            self._migrate()
            self.used_bytes = self._measure()
        except sqlite3.DatabaseError:
            self._db.close()
            raise

    def _check_integrity(self) -> None:
        """``PRAGMA quick_check`` at open: a damaged file is refused here, not at some later write."""
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"telemetry database is damaged: {'; '.join(map(str, problems))}")

    def _migrate(self) -> None:
        """Bring a file of an older schema to :data:`SCHEMA_VERSION` (additive: older agents still read it)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)").fetchall()}
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if "strikes" not in columns:
                    self._db.execute("ALTER TABLE items ADD COLUMN strikes INTEGER NOT NULL DEFAULT 0")
                if int(self._db.execute("PRAGMA user_version").fetchone()[0]) < SCHEMA_VERSION:
                    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _configure(self) -> None:
        for suffix in ("-wal", "-shm"):  # SQLite gives them the database's mode; older files are tightened
            _make_private(self.path.with_name(self.path.name + suffix), create=False)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA journal_size_limit={self.wal_limit_bytes}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={max(16, self.wal_limit_bytes // 4096 // 2)}")
        self._db.executescript(_SCHEMA)

    def _measure(self) -> int:
        row = self._db.execute("SELECT COALESCE(SUM(size_bytes + ?), 0) FROM items", (ROW_OVERHEAD_BYTES,)).fetchone()
        return int(row[0])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                self.used_bytes = self._measure()
                raise
            self._db.execute("COMMIT")
            self._bound_wal()

    def _bound_wal(self) -> None:
        """Keep the WAL file within its share of the cap, even after a large transaction."""
        try:
            wal_bytes = os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return
        if wal_bytes > self.wal_limit_bytes:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def put(self, kind: str, label: str, item: dict[str, Any]) -> bool:
        """Store one item; False (and a counted drop) if the cap leaves no room for it."""
        body = zlib.compress(json.dumps(item, separators=(",", ":")).encode("utf-8"), 6)
        return self.put_many([(kind, label, body)]) == 1

    def put_many(self, items: list[tuple[str, str, bytes]], clear_checkpoints_of: str | None = None) -> int:
        """Store pre-compressed items in one transaction; returns how many were kept.

        ``clear_checkpoints_of``: the owner whose checkpoints these items complete (closed windows),
        removed in the same transaction so that a window is never counted twice.
        """
        kept = 0
        with self._transaction() as db:
            for kind, label, body in items:
                kept += self._insert(db, kind, label, body)
            if clear_checkpoints_of is not None:
                db.execute("DELETE FROM checkpoints WHERE owner = ?", (clear_checkpoints_of,))
        return kept

    def checkpoint(self, owner: str, bodies: dict[str, bytes]) -> None:
        """Replace ``owner``'s checkpoints with ``bodies`` (key -> a compressed open window), in one transaction.

        A checkpoint is the window as it would close now; if its process dies before closing it,
        :meth:`recover_checkpoints` at the next start queues it as a window.
        """
        with self._transaction() as db:
            db.execute("DELETE FROM checkpoints WHERE owner = ?", (owner,))
            db.executemany("INSERT INTO checkpoints (owner, key, body) VALUES (?, ?, ?)",
                           [(owner, key, body) for key, body in bodies.items()])  # fmt: skip

    def recover_checkpoints(self, alive: Callable[[str], bool]) -> int:
        """Queue as windows the checkpoints of owners that are gone (``alive(owner)`` False); how many."""
        with self._transaction() as db:
            rows = db.execute("SELECT owner, key, body FROM checkpoints").fetchall()
            orphans = [(owner, key, body) for owner, key, body in rows if not alive(owner)]
            kept = sum(self._insert(db, "window", "window", body) for _owner, _key, body in orphans)
            db.executemany("DELETE FROM checkpoints WHERE owner = ? AND key = ?", [(o, k) for o, k, _ in orphans])
        return kept

    def _insert(self, db: sqlite3.Connection, kind: str, label: str, body: bytes) -> int:
        key = f"{kind}:{label}"
        if key in COALESCED:
            query = "SELECT seq FROM items WHERE label = ? AND kind = ? AND batch_id IS NULL"
            old = self._seqs(db, query, (label, kind))
            self._delete_rows(db, old)
        priority = priority_of(kind, label)
        need = len(body) + ROW_OVERHEAD_BYTES
        if not self._make_room(db, need, priority):
            self._count_drop(db, f"{kind}:cap", 1, len(body))
            return 0
        db.execute(
            "INSERT INTO items (kind, label, priority, size_bytes, body) VALUES (?, ?, ?, ?, ?)",
            (kind, label, priority, len(body), body),
        )
        self.used_bytes += need
        return 1

    def _make_room(self, db: sqlite3.Connection, need: int, priority: int) -> bool:
        """Evict items of lower or equal priority (lowest first, oldest first) until ``need`` fits.

        Evicts down to :data:`EVICT_TO` of the budget so that a full buffer does not evict on every put.
        """
        if self.used_bytes + need <= self.budget_bytes:
            return True
        target = int(self.budget_bytes * EVICT_TO) - need
        for level in range(MAX_PRIORITY, priority - 1, -1):
            if level == PRIORITIES["window"] and self.compact is not None:
                self._compact_windows(db, target)
                if self.used_bytes <= target:
                    break
            rows = db.execute(
                "SELECT seq, kind, size_bytes FROM items WHERE priority = ? AND batch_id IS NULL ORDER BY seq",
                (level,),
            )
            victims = self._victims(rows.fetchall(), target)
            if victims:
                db.executemany("DELETE FROM items WHERE seq = ?", [(seq,) for seq, _, _ in victims])
                for _, kind, size in victims:
                    self._count_drop(db, f"{kind}:cap", 1, size)
            if self.used_bytes <= target:
                break
        return self.used_bytes + need <= self.budget_bytes

    def _compact_windows(self, db: sqlite3.Connection, target: int) -> None:
        """Merge the oldest windows of each (model, version) into one per :data:`COMPACT_SPAN_S`, oldest first.

        Merged windows are stored with the label ``hour`` and are not merged again. Reads
        :data:`COMPACT_CHUNK` rows at a time and stops as soon as the bytes held reach ``target``.
        """
        last_seq = 0
        while self.used_bytes > target:
            rows = db.execute(
                "SELECT seq, size_bytes, body FROM items WHERE kind = 'window' AND label = 'window' "
                "AND batch_id IS NULL AND seq > ? ORDER BY seq LIMIT ?",
                (last_seq, COMPACT_CHUNK),
            ).fetchall()
            if not rows:
                return
            last_seq = rows[-1][0]
            groups: dict[tuple[Any, ...], list[tuple[int, int, dict[str, Any]]]] = {}
            for seq, size, body in rows:
                item = json.loads(zlib.decompress(body))
                groups.setdefault(_span_key(item), []).append((seq, size, item))
            for members in groups.values():
                if len(members) > 1 and self.compact is not None:
                    self._replace(db, [(seq, size) for seq, size, _ in members], self.compact([m[2] for m in members]))

    def _replace(self, db: sqlite3.Connection, rows: list[tuple[int, int]], merged: dict[str, Any]) -> None:
        """Delete ``rows`` (seq, size) and insert their merged window."""
        db.executemany("DELETE FROM items WHERE seq = ?", [(seq,) for seq, _ in rows])
        self.used_bytes -= sum(size + ROW_OVERHEAD_BYTES for _, size in rows)
        body = zlib.compress(json.dumps(merged, separators=(",", ":")).encode("utf-8"), 6)
        db.execute(
            "INSERT INTO items (kind, label, priority, size_bytes, body) VALUES ('window', 'hour', ?, ?, ?)",
            (PRIORITIES["window"], len(body), body),
        )
        self.used_bytes += len(body) + ROW_OVERHEAD_BYTES
        self.compacted += len(rows) - 1

    def _victims(self, rows: list[tuple[int, str, int]], target: int) -> list[tuple[int, str, int]]:
        """Oldest rows first until the bytes held reach ``target`` (updates the accounting)."""
        victims: list[tuple[int, str, int]] = []
        for seq, kind, size in rows:
            if self.used_bytes <= target:
                break
            victims.append((seq, kind, size))
            self.used_bytes -= size + ROW_OVERHEAD_BYTES
        return victims

    def _delete_rows(self, db: sqlite3.Connection, seqs: list[int]) -> None:
        for seq in seqs:
            size = db.execute("SELECT size_bytes FROM items WHERE seq = ?", (seq,)).fetchone()
            if size is not None:
                db.execute("DELETE FROM items WHERE seq = ?", (seq,))
                self.used_bytes -= int(size[0]) + ROW_OVERHEAD_BYTES

    def _seqs(self, db: sqlite3.Connection, query: str, params: tuple[Any, ...]) -> list[int]:
        return [int(row[0]) for row in db.execute(query, params).fetchall()]

    def _count_drop(self, db: sqlite3.Connection, label: str, items: int, size_bytes: int) -> None:
        db.execute(
            "INSERT INTO drops (label, items, size_bytes) VALUES (?, ?, ?) ON CONFLICT(label) DO UPDATE SET "
            "items = items + excluded.items, size_bytes = size_bytes + excluded.size_bytes",
            (label, items, size_bytes),
        )

    def drops(self) -> dict[str, int]:
        """Items dropped so far and not yet reported, by ``kind:reason``."""
        with self._lock:
            return {label: int(n) for label, n, _ in self._db.execute("SELECT label, items, size_bytes FROM drops")}

    def next_batch(
        self, max_items: int = 500, max_bytes: int = 1_000_000, exclude: Collection[str] = ()
    ) -> Batch | None:
        """The oldest in-flight batch not in ``exclude`` if there is one, else a new one from the items not
        in flight (highest priority, oldest first). ``exclude``: batches the caller holds back for now."""
        with self._transaction() as db:
            batch_id = self._in_flight(db, exclude)
            if batch_id is None:
                self._report_drops(db)
                batch_id = uuid.uuid4().hex
                picked = self._pick(db, max_items, max_bytes)
                if not picked:
                    return None
                db.executemany("UPDATE items SET batch_id = ? WHERE seq = ?", [(batch_id, seq) for seq in picked])
            rows = db.execute("SELECT kind, body FROM items WHERE batch_id = ? ORDER BY seq", (batch_id,)).fetchall()
        return _assemble(batch_id, rows)

    def _in_flight(self, db: sqlite3.Connection, exclude: Collection[str]) -> str | None:
        excluded = list(exclude)
        marks = ",".join("?" * len(excluded))
        query = "SELECT batch_id FROM items WHERE batch_id IS NOT NULL"
        query += f" AND batch_id NOT IN ({marks}) ORDER BY seq LIMIT 1" if excluded else " ORDER BY seq LIMIT 1"
        row = db.execute(query, excluded).fetchone()
        return None if row is None else str(row[0])

    def _pick(self, db: sqlite3.Connection, max_items: int, max_bytes: int) -> list[int]:
        picked: list[int] = []
        total = 0
        cursor = db.execute(
            "SELECT seq, size_bytes FROM items WHERE batch_id IS NULL ORDER BY priority ASC, seq ASC LIMIT ?",
            (max_items,),
        )
        for seq, size in cursor.fetchall():
            if picked and total + size > max_bytes:
                break
            picked.append(seq)
            total += size
        return picked

    def _report_drops(self, db: sqlite3.Connection) -> None:
        """Turn the drop counts into a ``drops`` event (priority 0) and reset them."""
        counts = {label: int(n) for label, n in db.execute("SELECT label, items FROM drops WHERE items > 0")}
        if not counts:
            return
        from device_agent.telemetry.events import make_event

        event = make_event("drops", dropped=counts)
        body = zlib.compress(json.dumps(event, separators=(",", ":")).encode("utf-8"), 6)
        db.execute("DELETE FROM drops")
        self._insert(db, "event", "drops", body)

    def shrink(self, batch_id: str, keep: int) -> int:
        """A batch too big to send, not sent yet: keep its first ``keep`` items (oldest first) and release
        the others to later batches. Returns how many were released."""
        with self._transaction() as db:
            seqs = self._seqs(db, "SELECT seq FROM items WHERE batch_id = ? ORDER BY seq", (batch_id,))
            released = seqs[max(keep, 0) :]
            db.executemany("UPDATE items SET batch_id = NULL, strikes = 0 WHERE seq = ?", [(seq,) for seq in released])
        return len(released)

    def strike(self, batch_id: str) -> int:
        """Count a 5xx the batch got while the server acknowledged another batch; its strikes so far."""
        with self._transaction() as db:
            db.execute("UPDATE items SET strikes = strikes + 1 WHERE batch_id = ?", (batch_id,))
            row = db.execute("SELECT MAX(strikes) FROM items WHERE batch_id = ?", (batch_id,)).fetchone()
        return int(row[0] or 0)

    def ack(self, batch_id: str) -> int:
        """The server has the batch: delete its items. Returns how many were deleted."""
        with self._transaction() as db:
            seqs = self._seqs(db, "SELECT seq FROM items WHERE batch_id = ?", (batch_id,))
            self._delete_rows(db, seqs)
        return len(seqs)

    def reject(self, batch_id: str, reason: str) -> None:
        """The server refused the batch for good: drop its items and count them under ``reason``."""
        with self._transaction() as db:
            for kind, count, size in db.execute(
                "SELECT kind, COUNT(*), SUM(size_bytes) FROM items WHERE batch_id = ? GROUP BY kind", (batch_id,)
            ).fetchall():
                self._count_drop(db, f"{kind}:{reason}", int(count), int(size))
            self._delete_rows(db, self._seqs(db, "SELECT seq FROM items WHERE batch_id = ?", (batch_id,)))

    def stats(self) -> dict[str, int]:
        """Items and bytes held (for heartbeats and tests)."""
        with self._lock:
            items = int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        return {"items": items, "bytes": self.used_bytes, "cap_bytes": self.cap_bytes}

    def count_by_label(self) -> dict[str, int]:
        """Items held by ``kind:label``."""
        with self._lock:
            rows = self._db.execute("SELECT kind, label, COUNT(*) FROM items GROUP BY kind, label").fetchall()
        return {f"{kind}:{label}": int(n) for kind, label, n in rows}

    def disk_bytes(self) -> int:
        """Bytes the buffer takes on disk (database, WAL and shared-memory files)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        total = 0
        for suffix in ("", "-wal", "-shm"):
            candidate = Path(str(self.path) + suffix)
            if candidate.exists():
                total += candidate.stat().st_size
        return total

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _span_key(window: dict[str, Any]) -> tuple[Any, ...]:
    """(model, version, start of the compaction span) of a window item."""
    start = dt.datetime.fromisoformat(str(window.get("start")))
    span = int(start.timestamp() // COMPACT_SPAN_S)
    return (window.get("model"), window.get("version"), span)


def _assemble(batch_id: str, rows: list[tuple[str, bytes]]) -> Batch:
    batch = Batch(batch_id, [], [], [])
    lists = {"event": batch.events, "window": batch.windows, "sample": batch.samples}
    for kind, body in rows:
        lists[kind].append(json.loads(zlib.decompress(body)))
    return batch


def _make_private(path: Path, create: bool = True) -> None:
    """Mode 0600 for a buffer file (created empty if missing): samples may hold users' inputs."""
    if create:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    if path.exists() and path.stat().st_mode & 0o077:
        path.chmod(0o600)

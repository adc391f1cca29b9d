"""Telemetry intake on PostgreSQL: the uploads that arrive together are stored in one statement and one commit.

An agent's upload is a small transaction (a batch row and a few item rows). On a busy node the costs
per statement (converting and sending its parameters, parsing and planning it, one commit and its WAL
flush) are larger than the rows' own, so the uploads waiting in one server process are stored
together (group commit):

- the first upload to arrive schedules a flush; the flush takes a pooled connection and then every
  upload waiting at that moment (all that arrived in the same event-loop turns), and stores them in
  one statement on an autocommit connection: one transaction;
- every upload is answered only after that statement has returned, that is after its commit (with
  PostgreSQL's ``synchronous_commit``, on by default, durable), so nothing acknowledged can be lost;
- exactly once: each batch row is inserted with ``ON CONFLICT DO NOTHING`` and items are inserted only
  for the batch rows the statement created; two uploads of the same batch never share a statement
  (the second waits for the next flush and is then answered as a retry);
- isolation: if a group's statement fails, each of its uploads is stored again alone, so a batch the
  database refuses fails its own request only;
- at most ``max_flushes`` statements are in flight per event loop; the uploads that arrive meanwhile
  wait and go together in the next one.

A lone upload is a group of one: the same statement, sent at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import weakref
from dataclasses import dataclass, field
from typing import Any

from fleet_server.db import utcnow
from fleet_server.services.async_pg import AsyncPgPool, run_query
from fleet_server.services.telemetry_intake import IntakeResult

MAX_GROUP_ITEMS = 5_000
"""A flush takes uploads until their items pass this (it always takes at least one upload)."""

# Every parameter is sent in binary (``%(...)b``): text arrays of JSON in text format are escaped value by
# value (a regular-expression substitution per quote), which cost more than the rest of the upload.
# ``i`` numbers the group's uploads (``k``); ``new`` maps each upload that created its batch row to that
# row; items are inserted in the order they were sent (``ORDER BY n``), which their ids keep.
GROUP_STORE_SQL = """
WITH i AS (
    SELECT * FROM unnest(%(k)b::int[], %(device)b::text[], %(batch)b::text[], %(n_events)b::int[],
                         %(n_windows)b::int[], %(n_samples)b::int[], %(size)b::int[])
        AS i(k, device, batch, n_events, n_windows, n_samples, size)
), b AS (
    INSERT INTO telemetry_batches (device_id, batch_id, received_at, events, windows, samples, size_bytes)
    SELECT device, batch, %(now)b, n_events, n_windows, n_samples, size FROM i ORDER BY k
    ON CONFLICT (device_id, batch_id) DO NOTHING RETURNING id, device_id, batch_id
), new AS (
    SELECT i.k, b.id, i.device FROM b JOIN i ON i.device = b.device_id AND i.batch = b.batch_id
), e AS (
    INSERT INTO device_events (batch_pk, device_id, type, model_name, bundle_version, at, payload, folded)
    SELECT new.id, new.device, t.type, t.model, t.version, t.at, CAST(t.payload AS json), t.folded
    FROM unnest(%(e_k)b::int[], %(e_type)b::text[], %(e_model)b::text[], %(e_version)b::int[],
                %(e_at)b::timestamptz[], %(e_payload)b::text[], %(e_folded)b::bool[])
        WITH ORDINALITY AS t(k, type, model, version, at, payload, folded, n)
    JOIN new ON new.k = t.k ORDER BY t.n
), w AS (
    INSERT INTO metric_windows (batch_pk, device_id, model_name, bundle_version, window_start, window_end, payload)
    SELECT new.id, new.device, t.model, t.version, t.start, t.end_, CAST(t.payload AS json)
    FROM unnest(%(w_k)b::int[], %(w_model)b::text[], %(w_version)b::int[], %(w_start)b::timestamptz[],
                %(w_end)b::timestamptz[], %(w_payload)b::text[])
        WITH ORDINALITY AS t(k, model, version, start, end_, payload, n)
    JOIN new ON new.k = t.k ORDER BY t.n
), s AS (
    INSERT INTO prediction_samples (batch_pk, device_id, model_name, bundle_version, reason, at, payload)
    SELECT new.id, new.device, t.model, t.version, t.reason, t.at, CAST(t.payload AS json)
    FROM unnest(%(s_k)b::int[], %(s_model)b::text[], %(s_version)b::int[], %(s_reason)b::text[],
                %(s_at)b::timestamptz[], %(s_payload)b::text[])
        WITH ORDINALITY AS t(k, model, version, reason, at, payload, n)
    JOIN new ON new.k = t.k ORDER BY t.n
)
SELECT k FROM new
"""
STORED_COUNTS_SQL = (
    "SELECT events, windows, samples FROM telemetry_batches WHERE device_id = %(device)s AND batch_id = %(batch)s"
)
# The item columns per kind, as ``unnest`` reads them (prefix, row keys).
ITEM_COLUMNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "events": ("e", ("type", "model_name", "bundle_version", "at", "payload", "folded")),
    "windows": ("w", ("model_name", "bundle_version", "window_start", "window_end", "payload")),
    "samples": ("s", ("model_name", "bundle_version", "reason", "at", "payload")),
}
PARAM_NAMES = {"model_name": "model", "bundle_version": "version", "window_start": "start", "window_end": "end"}


@dataclass
class Upload:
    """One checked batch waiting to be stored: its rows per kind (``telemetry_intake.*_rows``)."""

    device_id: str
    batch_id: str
    size_bytes: int
    rows: dict[str, list[dict[str, Any]]]
    future: asyncio.Future[IntakeResult]

    @property
    def key(self) -> tuple[str, str]:
        return self.device_id, self.batch_id

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(kind_rows) for kind, kind_rows in self.rows.items()}


@dataclass
class _LoopState:
    pending: list[Upload] = field(default_factory=list)
    scheduled: bool = False  # a flush is waiting for a connection and will take what is pending
    in_flight: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class GroupCommitter:
    """Stores telemetry batches on PostgreSQL's asyncio pool, the ones that arrive together in one statement."""

    def __init__(self, pool: AsyncPgPool, max_flushes: int = 2, max_group_items: int = MAX_GROUP_ITEMS) -> None:
        self.pool = pool
        self.max_flushes = max_flushes
        self.max_group_items = max_group_items
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    async def store(
        self, device_id: str, batch_id: str, rows: dict[str, list[dict[str, Any]]], size_bytes: int
    ) -> IntakeResult:
        """Store one checked batch (exactly once); returns once it is committed, or raises what storing it raised."""
        loop = asyncio.get_running_loop()
        state = self._states.setdefault(loop, _LoopState())
        upload = Upload(device_id, batch_id, size_bytes, rows, loop.create_future())
        state.pending.append(upload)
        self._schedule(state)
        return await upload.future

    def _schedule(self, state: _LoopState) -> None:
        if state.pending and not state.scheduled and state.in_flight < self.max_flushes:
            state.scheduled = True
            state.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._flush(state))
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)

    async def _flush(self, state: _LoopState) -> None:
        group: list[Upload] | None = None  # None until this flush has taken its group
        retry_alone: list[Upload] = []
        try:
            async with self.pool.connection() as connection:
                group = self._take(state)
                if group:
                    await self._store_group(connection, group)
        except Exception as error:
            if group is None:  # no connection: the uploads waiting now get the error (503: the agent retries later)
                group = self._take(state)
                _fail(group, error)
            elif len(group) == 1:
                _fail(group, error)
            else:
                retry_alone = [upload for upload in group if not upload.future.done()]
        finally:
            if group is None:  # cancelled before it took a group: let another flush take them
                state.scheduled = False
            state.in_flight -= 1
            self._schedule(state)
        if retry_alone:
            await self._store_each_alone(retry_alone)

    def _take(self, state: _LoopState) -> list[Upload]:
        """The uploads pending now, one per batch key, up to ``max_group_items`` items (at least one)."""
        state.scheduled = False
        group: list[Upload] = []
        keys: set[tuple[str, str]] = set()
        left: list[Upload] = []
        items = 0
        for upload in state.pending:
            size = sum(upload.counts.values())
            if upload.future.done() or upload.key in keys or (group and items + size > self.max_group_items):
                if not upload.future.done():
                    left.append(upload)
                continue
            group.append(upload)
            keys.add(upload.key)
            items += size
        state.pending = left
        return group

    async def _store_group(self, connection: Any, group: list[Upload]) -> None:
        created = {k for (k,) in await run_query(connection, GROUP_STORE_SQL, group_params(group, utcnow()))}
        for k in created:  # answered at once: committed whatever happens next
            _answer(group[k], IntakeResult(accepted=group[k].counts, duplicate=False))
        for k, upload in enumerate(group):
            if k not in created:  # a retry of a batch already stored
                params = {"device": upload.device_id, "batch": upload.batch_id}
                events, windows, samples = (await run_query(connection, STORED_COUNTS_SQL, params))[0]
                _answer(upload, IntakeResult({"events": events, "windows": windows, "samples": samples}, True))

    async def _store_each_alone(self, group: list[Upload]) -> None:
        """After a group's statement failed: each upload in its own statement, its own error to its own request."""
        for upload in group:
            if upload.future.done():
                continue
            try:
                async with self.pool.connection() as connection:
                    await self._store_group(connection, [upload])
            except Exception as error:
                _fail([upload], error)


def _answer(upload: Upload, result: IntakeResult) -> None:
    if not upload.future.done():  # (its request may have been cancelled meanwhile)
        upload.future.set_result(result)


def _fail(uploads: list[Upload], error: Exception) -> None:
    for upload in uploads:
        if not upload.future.done():
            upload.future.set_exception(error)


def group_params(group: list[Upload], now: dt.datetime) -> dict[str, Any]:
    """The statement's parameters: one array per column, items tagged with their upload's number ``k``."""
    params: dict[str, Any] = {
        "now": now,
        "k": list(range(len(group))),
        "device": [u.device_id for u in group],
        "batch": [u.batch_id for u in group],
        "size": [u.size_bytes for u in group],
        **{f"n_{kind}": [len(u.rows[kind]) for u in group] for kind in ITEM_COLUMNS},
    }
    for kind, (prefix, columns) in ITEM_COLUMNS.items():
        params[f"{prefix}_k"] = [k for k, u in enumerate(group) for _ in u.rows[kind]]
        for column in columns:
            params[f"{prefix}_{PARAM_NAMES.get(column, column)}"] = [row[column] for u in group for row in u.rows[kind]]
    return params

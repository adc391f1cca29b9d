"""The fold: telemetry added into the rollout engine's running sums once, as it arrives.

A tick used to recompute every gate from every metric window a wave's devices had sent since it
started: 5 to 9 seconds at 10,000 devices with a window a minute. Instead, each new row is added
once into what the engine keeps:

- metric windows into **rollups** (``rollout_rollups``): per rollout, wave, cohort (``wave`` for
  the wave's released devices on the version they were told to run, ``control`` for members not
  released yet on their previous version, and :func:`variant_cohort` for the wave's devices of one
  variant, so gates and views can split a wave by variant) and bundle version, the element-wise sum
  of the windows (``bundles.windows``), their count and the number of devices that contributed;
- each such window also into its device's **share** of the rollup (``rollout_device_sums``: the sum of
  that device's windows there, kept as column sums per window shape, and its sample counts), from
  which an evaluation bounds what one device weighs (:mod:`.weights`); control windows only for a
  rollout with a gate relative to the control cohort (otherwise its figures decide nothing);
- windows, ``install`` events and heartbeats of a released device into its **evidence**
  (``rollout_devices.evidence``, :class:`.observe.Evidence`), from which the tick classifies it.

What is left to fold is queued: an insert trigger puts the id of every new window, and of every new
``install`` or heartbeat event, into ``unfolded_windows`` / ``unfolded_events`` (migration ``0012``),
whoever writes the row. Rows are folded in chunks of at most :data:`CHUNK_ROWS`, each in one short
transaction that also deletes their ids from the queue, so a row is added exactly once whatever
crashes (a queued id whose row is gone, purged by retention, is only dequeued); the whole fold runs in a
critical section (:func:`fleet_server.locks.serialized`, shared with the engine's evaluations), so
two processes (the background leader and an operator's ``evaluate``) never fold the same rows, nor
fold a device's reports while the other releases it. A window whose payload does not parse or
breaks the window contract (``bundles.windows.check_window``: it was stored before intake checked
it, or written past intake) is left out and counted as ``invalid_windows``; an event is read
leniently (what it does not say right is ignored; a reason is kept with any lone surrogate escaped);
and a row whose folding raises anyway is left out, logged and counted (``invalid_windows`` or
``invalid_events``), so that no stored row can stop the fold, which every rollout waits for. On
SQLite every write of a chunk happens at its end, so the database's write lock is
held for the few milliseconds the writes take, never while windows are parsed and added.

A window is routed by the indexed columns the intake wrote (device, model, version, times) and the
device's membership in the active rollout of that model: only the rollout's current wave is folded
(earlier waves are decided), control windows only if they end after the current wave started.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import BigInteger, Select, Table, Text, any_, bindparam, cast, delete, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from bundles import jsonio
from bundles.errors import ConfigError
from bundles.windows import PartsShape, is_valid_window, merge_fields, merge_window_parts, window_parts
from fleet_server.db import among, utcnow
from fleet_server.locks import serialized
from fleet_server.models import DeviceEvent, MetricWindow
from fleet_server.rollouts.gates import parse_gates
from fleet_server.rollouts.models import (
    Rollout,
    RolloutDevice,
    RolloutDeviceSum,
    RolloutRollup,
    RolloutWave,
    UnfoldedEvent,
    UnfoldedWindow,
)
from fleet_server.rollouts.observe import Evidence
from fleet_server.rollouts.states import RolloutState
from fleet_server.rollouts.weights import SAMPLE_KINDS, added_share, samples_of

log = logging.getLogger("fleet_server.rollouts.fold")

ACTIVE_STATES = (RolloutState.RUNNING.value, RolloutState.PAUSED.value, RolloutState.AWAITING_APPROVAL.value)
CHUNK_ROWS = {"sqlite": 500, "postgresql": 5000}
"""Rows folded per transaction: small on SQLite, whose one write lock every writer waits for."""
WAVE, CONTROL = "wave", "control"
ENGINE_LOCK = "rollout-engine"
"""The critical section of the fold and of every evaluation: one at a time per database."""

RollupKey = tuple[int, int, str, int]  # rollout id, wave index, cohort, bundle version


@functools.lru_cache(maxsize=1024)
def variant_cohort(variant: str) -> str:
    """The rollup cohort of a wave's devices directed to ``variant`` (16 characters: the column's width)."""
    return "v:" + hashlib.sha256(variant.encode("utf-8")).hexdigest()[:14]


@dataclass
class FoldReport:
    """What one :func:`fold_pending` did."""

    windows: int = 0
    events: int = 0
    invalid_windows: int = 0
    chunks: int = 0
    drained: bool = False  # the last chunk found fewer rows than it could take: nothing was left to fold
    invalid_events: int = 0  # stored events whose folding raised (left out, logged)

    def add(self, other: FoldReport) -> None:
        self.windows += other.windows
        self.events += other.events
        self.invalid_windows += other.invalid_windows
        self.chunks += other.chunks
        self.invalid_events += other.invalid_events
        self.drained = other.drained


def fold_pending(factory: sessionmaker[Session], max_chunks: int | None = None) -> FoldReport:
    """Fold every unfolded window and event (or ``max_chunks`` chunks of them); returns the counts."""
    report = FoldReport()
    while max_chunks is None or report.chunks < max_chunks:
        with factory() as session:
            chunk = fold_chunk(session)
        report.add(chunk)
        if chunk.drained:  # what arrives meanwhile waits for the next fold (no query to find nothing)
            break
    return report


def fold_chunk(session: Session) -> FoldReport:
    """Fold one chunk in one transaction (committed here)."""
    limit = CHUNK_ROWS.get(session.get_bind().dialect.name, 500)
    with serialized(session, ENGINE_LOCK):
        connection = session.connection()  # Core: plain columns need no ORM row layer (thousands of rows)
        window_ids = list(connection.execute(unfolded_windows(limit)).scalars())
        event_ids = list(connection.execute(unfolded_events(limit)).scalars())
        if not window_ids and not event_ids:
            session.rollback()
            return FoldReport(drained=True)
        windows = connection.execute(windows_by_id(session, window_ids)).all() if window_ids else []
        events = connection.execute(events_by_id(session, event_ids)).all() if event_ids else []
        plan = _Plan.load(session, {w.device_id for w in windows} | {e.device_id for e in events})
        for window in windows:  # in id order; an id whose row was purged since (retention) is only dequeued
            try:
                plan.add_window(window)
            except Exception:  # a stored row nothing here foresaw: it must not stop every rollout's fold
                plan.invalid += 1
                log.exception("window %s left out of the fold: folding it raised", window[0])
        for event in events:
            try:
                plan.add_event(event)
            except Exception:  # (the same)
                plan.invalid_events += 1
                log.exception("event %s left out of the fold: folding it raised", event[0])
        plan.write(session, window_ids, event_ids)
        session.commit()
    drained = len(window_ids) < limit and len(event_ids) < limit
    return FoldReport(len(window_ids), len(event_ids), plan.invalid, 1, drained, plan.invalid_events)


def unfolded_windows(limit: int) -> Select[int]:
    """The ids of the oldest ``limit`` queued windows."""
    return select(UnfoldedWindow.window_id).order_by(UnfoldedWindow.window_id).limit(limit)


def unfolded_events(limit: int) -> Select[int]:
    """The ids of the oldest ``limit`` queued events."""
    return select(UnfoldedEvent.event_id).order_by(UnfoldedEvent.event_id).limit(limit)


def windows_by_id(session: Session, ids: list[int]) -> Select[int, str, str, int, dt.datetime, dt.datetime, str]:
    """The windows of ``ids`` that are still stored, in id order (a separate query from the queue's: a join lets
    PostgreSQL pick a merge join that walks ``metric_windows`` from its first row)."""
    return (
        select(MetricWindow.id, MetricWindow.device_id, MetricWindow.model_name, MetricWindow.bundle_version,
               MetricWindow.window_start, MetricWindow.window_end, cast(MetricWindow.payload, Text))
        .where(_among_ids(session, MetricWindow.id, ids)).order_by(MetricWindow.id)
    )  # fmt: skip


def events_by_id(session: Session, ids: list[int]) -> Select[int, str, str, str | None, int | None, dt.datetime, str]:
    """The events of ``ids`` that are still stored, in id order."""
    return (
        select(DeviceEvent.id, DeviceEvent.device_id, DeviceEvent.type, DeviceEvent.model_name,
               DeviceEvent.bundle_version, DeviceEvent.at, cast(DeviceEvent.payload, Text))
        .where(_among_ids(session, DeviceEvent.id, ids)).order_by(DeviceEvent.id)
    )  # fmt: skip


@dataclass
class _Member:
    """A device's row in an active rollout, as the fold needs it."""

    rollout_id: int
    device_id: str
    wave_index: int | None
    released_at: dt.datetime | None
    start_after: dt.datetime | None
    previous_version: int | None
    evidence_text: str | None
    running_since: dt.datetime | None
    variant: str | None = None
    evidence: Evidence | None = None
    changed: bool = False
    shadow: bool = False
    target: int = 0
    stamp: int = 0  # the rollout's evaluations: what ``evidence_seq`` is set to when the evidence changes
    stored: dict[str, Any] | None = None  # ``evidence_text`` parsed

    def loaded_evidence(self) -> Evidence:
        if self.evidence is None:
            self.evidence = Evidence.from_json(self._stored(), self.start_after)
            if self.running_since is not None:  # found before evidence was kept
                self.evidence.running(self.running_since)
        return self.evidence

    def counted(self) -> str | None:
        """The rollup the device was last counted in (read without building its evidence: most windows ask only
        this, and most devices' answer does not change)."""
        if self.evidence is not None:
            return self.evidence.counted
        label = self._stored().get("counted")
        return label if isinstance(label, str) else None

    def _stored(self) -> dict[str, Any]:
        if self.stored is None:
            self.stored = _json_object(self.evidence_text) or {}
        return self.stored


@dataclass
class _Rollout:
    id: int
    model: str
    version: int
    wave: int
    wave_started_at: dt.datetime | None
    wave_shadow: bool
    evaluations: int = 0
    control_shares: bool = True  # a gate is relative to the control cohort: its devices' shares are kept too


@dataclass
class _Rollup:
    parts: list[tuple[PartsShape, list[int], list[float]]] = field(default_factory=list)  # usual windows, apart
    others: list[dict[str, Any]] = field(default_factory=list)  # valid windows of other shapes
    windows: int = 0
    invalid: int = 0
    devices: int = 0


@dataclass
class _Share:
    """A device's windows of the chunk for one rollup (added to its row of ``rollout_device_sums``)."""

    parts: list[tuple[PartsShape, list[int], list[float]]] = field(default_factory=list)
    others: list[dict[str, Any]] = field(default_factory=list)
    samples: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # weights.SAMPLE_KINDS

    def add(self, parts: tuple[PartsShape, list[int], list[float]] | None, payload: dict[str, Any]) -> None:
        if parts is not None:
            self.parts.append(parts)
        else:
            self.others.append(payload)
        requests, shadow, generations = samples_of(payload)
        samples = self.samples
        samples[0], samples[1], samples[2] = samples[0] + requests, samples[1] + shadow, samples[2] + generations


@dataclass
class _Plan:
    """The chunk's effect, computed in memory before anything is written."""

    rollouts: dict[int, _Rollout]
    members: dict[tuple[str, str], tuple[_Rollout, _Member]]  # (device, model) -> its active rollout
    by_device: dict[str, list[tuple[_Rollout, _Member]]]
    rollups: dict[RollupKey, _Rollup] = field(default_factory=lambda: defaultdict(_Rollup))
    invalid: int = 0
    invalid_events: int = 0
    labels: dict[RollupKey, str] = field(default_factory=dict)
    shares: dict[tuple[RollupKey, str], _Share] = field(default_factory=lambda: defaultdict(_Share))
    """Per (rollup, device): the device's windows added to the rollup (its share, ``rollout_device_sums``)."""

    @classmethod
    def load(cls, session: Session, device_ids: set[str]) -> _Plan:
        rollouts = _active_rollouts(session)
        members: dict[tuple[str, str], tuple[_Rollout, _Member]] = {}
        by_device: dict[str, list[tuple[_Rollout, _Member]]] = defaultdict(list)
        if rollouts and device_ids:
            query = select(RolloutDevice.rollout_id, RolloutDevice.device_id, RolloutDevice.wave_index,
                           RolloutDevice.released_at, RolloutDevice.start_after, RolloutDevice.previous_version,
                           cast(RolloutDevice.evidence, Text), RolloutDevice.running_since,
                           RolloutDevice.variant).where(
                RolloutDevice.rollout_id.in_(list(rollouts)), _among(session, RolloutDevice.device_id, device_ids),
                RolloutDevice.membership == "member")  # fmt: skip
            for row in session.connection().execute(query).all():  # evidence as text: parsed only when needed
                rollout, member = rollouts[row[0]], _Member(*row)
                member.target, member.stamp = rollout.version, rollout.evaluations
                member.shadow = rollout.wave_shadow and member.previous_version is not None
                members[(member.device_id, rollout.model)] = (rollout, member)
                by_device[member.device_id].append((rollout, member))
        return cls(rollouts, members, by_device)

    def add_window(self, window: Any) -> None:
        _, device_id, model, version, start, end, payload_text = window
        found = self.members.get((device_id, model))
        if found is None:
            return
        rollout, member = found
        if rollout.wave_started_at is None or end <= rollout.wave_started_at:
            return
        released = member.released_at is not None and end > member.released_at
        if not released:
            if version == member.previous_version:
                self._count(member, (rollout.id, rollout.wave, CONTROL, version), payload_text,
                            share=rollout.control_shares)  # fmt: skip
            return
        if member.wave_index != rollout.wave or member.start_after is None:
            return
        shadow = rollout.wave_shadow and member.previous_version is not None
        if version == (member.previous_version if shadow else rollout.version):
            also = None if shadow or not member.variant else (rollout.id, rollout.wave, variant_cohort(member.variant),
                                                              version)  # fmt: skip
            self._count(member, (rollout.id, rollout.wave, WAVE, version), payload_text, also)
        member.loaded_evidence().fold_window(start, end, int(version), rollout.version, shadow)
        member.changed = True

    def _count(self, member: _Member, key: RollupKey, payload_text: str, also: RollupKey | None = None,
               share: bool = True) -> None:  # fmt: skip
        """Add a window to ``key``'s rollup (and to ``also``'s, the device's variant cohort of the same wave), and
        unless ``share`` is False to the device's share of it."""
        rollups = [self.rollups[key]] + ([self.rollups[also]] if also is not None else [])
        payload = _json_object(payload_text)
        parts = window_parts(payload) if payload is not None else None  # the usual window: checked in bulk
        if parts is None and (payload is None or not is_valid_window(payload)):
            for rollup in rollups:
                rollup.invalid += 1
            self.invalid += 1
            return
        label = self.labels.get(key) or self.labels.setdefault(key, ":".join(str(part) for part in key))
        new_device = member.counted() != label
        if new_device:
            member.loaded_evidence().counted = label
            member.changed = True
        if share:  # the device's share (its variant cohort's share is the wave's: one variant a device)
            self.shares[(key, member.device_id)].add(parts, typing.cast(dict[str, Any], payload))
        for rollup in rollups:
            if parts is not None:
                rollup.parts.append(parts)
            else:
                rollup.others.append(typing.cast(dict[str, Any], payload))
            rollup.windows += 1
            rollup.devices += int(new_device)

    def add_event(self, event: Any) -> None:
        event_id, device_id, kind, model, version, at, payload_text = event
        members = self.by_device.get(device_id, [])
        payload = (_json_object(payload_text) or {}) if members else {}
        for rollout, member in members:
            if member.wave_index != rollout.wave or member.start_after is None:
                continue
            if kind == "install" and model == rollout.model:
                member.loaded_evidence().fold_install(at, version, payload, rollout.version)
                member.changed = True
            elif kind == "heartbeat":
                member.loaded_evidence().fold_heartbeat(at, event_id, payload, rollout.model, rollout.version)
                member.changed = True

    def write(self, session: Session, window_ids: list[int], event_ids: list[int]) -> None:
        """Every write of the chunk, in one burst after all the computing (on SQLite the first write takes the
        database's write lock): evidence, rollups, then the queue."""
        now = utcnow()
        sums: dict[tuple[int, ...], dict[str, Any]] = {}  # a wave's and its one variant's windows: added once
        added = {}
        for key, delta in self.rollups.items():
            same = (*map(id, delta.parts), -1, *map(id, delta.others))
            if same not in sums:
                sums[same] = merge_window_parts(delta.parts, delta.others)
            added[key] = sums[same]
        existing = _existing_rollups(session, list(self.rollups))
        shares = _serialized(session, _shares_after(session, self.shares))
        _write_evidence(session, [m for _, m in self.members.values() if m.changed])
        for key, delta in self.rollups.items():
            _write_rollup(session, key, delta, added[key], existing.get(key), now)
        _write_shares(session, shares)
        _dequeue(session, UnfoldedWindow.window_id, window_ids)
        _dequeue(session, UnfoldedEvent.event_id, event_ids)


def _among(session: Session, column: Any, values: set[str]) -> Any:
    """``column IN values``: one array parameter on PostgreSQL (a statement with thousands of parameters costs
    more to render and send than to run), bound values on SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam("among_ids", sorted(values), type_=ARRAY(Text)))
    return among(column, values)


def _among_ids(session: Session, column: Any, ids: list[int]) -> Any:
    """``column IN ids``: one array parameter on PostgreSQL, bound values on SQLite (at most a chunk of them)."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(f"{column.key}_ids", ids, type_=ARRAY(BigInteger)))
    return column.in_(ids)


def _dequeue(session: Session, column: Any, ids: list[int]) -> None:
    """Delete folded ids from their queue (``column``: the queue table's only column)."""
    if ids:
        session.execute(delete(column.class_.__table__).where(_among_ids(session, column, ids)))


def _active_rollouts(session: Session) -> dict[int, _Rollout]:
    query = (
        select(Rollout.id, Rollout.model_name, Rollout.bundle_version, Rollout.current_wave, RolloutWave.started_at,
               RolloutWave.shadow, Rollout.evaluations, Rollout.policy)
        .outerjoin(RolloutWave, (RolloutWave.rollout_id == Rollout.id) & (RolloutWave.index == Rollout.current_wave))
        .where(Rollout.state.in_(ACTIVE_STATES))
    )  # fmt: skip
    return {row[0]: _Rollout(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], has_relative_gate(row[7]))
            for row in session.execute(query)}  # fmt: skip


def has_relative_gate(policy: Any) -> bool:
    """Whether a stored policy has a gate relative to the control cohort (``p99_ms<1.2x``): then the control's
    figures decide too, and count each device at a bounded weight like the wave's (True when it does not parse)."""
    try:
        return any(gate.relative for gate in parse_gates(list(policy.get("gates") or ())))
    except (ConfigError, AttributeError, TypeError):
        return True


def _json_object(payload_text: Any) -> dict[str, Any] | None:
    """A stored payload as an object (None when it does not parse as one; never raises)."""
    try:
        payload = jsonio.loads(payload_text) if isinstance(payload_text, str) else payload_text
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _existing_rollups(session: Session, keys: list[RollupKey]) -> dict[RollupKey, RolloutRollup]:
    if not keys:
        return {}
    rollout_ids = list({k[0] for k in keys})
    rows = session.scalars(select(RolloutRollup).where(RolloutRollup.rollout_id.in_(rollout_ids)))
    wanted = set(keys)
    found = {(r.rollout_id, r.wave_index, r.cohort, r.bundle_version): r for r in rows}
    return {k: v for k, v in found.items() if k in wanted}


def _write_rollup(
    session: Session,
    key: RollupKey,
    delta: _Rollup,
    added: dict[str, Any],
    row: RolloutRollup | None,
    now: dt.datetime,
) -> None:
    """Add ``delta`` (whose windows sum to ``added``) to the rollup's row."""
    if row is None:
        row = RolloutRollup(rollout_id=key[0], wave_index=key[1], cohort=key[2], bundle_version=key[3], windows=0,
                            invalid_windows=0, devices=0, merged={})  # fmt: skip
        session.add(row)
    row.merged = merge_fields([row.merged or {}, added])
    row.windows += delta.windows
    row.invalid_windows += delta.invalid
    row.devices += delta.devices
    row.updated_at = now


def _shares_after(session: Session, deltas: dict[tuple[RollupKey, str], _Share]) -> list[dict[str, Any]]:
    """The devices' shares with this chunk's windows added, as rows of ``rollout_device_sums`` (read and summed
    before any write: on SQLite the first write takes the write lock)."""
    by_key: dict[RollupKey, list[str]] = defaultdict(list)
    for key, device_id in deltas:
        by_key[key].append(device_id)
    stored: dict[tuple[RollupKey, str], tuple[Any, ...]] = {}
    table = RolloutDeviceSum
    for key, device_ids in by_key.items():
        query = select(table.device_id, table.requests, table.shadow_samples, table.generations,
                       cast(table.merged, Text)).where(
            table.rollout_id == key[0], table.wave_index == key[1], table.cohort == key[2],
            table.bundle_version == key[3], _among(session, table.device_id, set(device_ids)))  # fmt: skip
        stored.update(((key, row[0]), tuple(row[1:])) for row in session.connection().execute(query))
    rows = []
    for (key, device_id), delta in deltas.items():
        before = stored.get((key, device_id))
        samples = [a + b for a, b in zip(before[:3], delta.samples, strict=True)] if before else delta.samples
        share = added_share(_stored_share(before[3]) if before else None, delta.parts, delta.others)
        rows.append({"r": key[0], "w": key[1], "c": key[2], "v": key[3], "d": device_id,
                     **dict(zip(SAMPLE_KINDS, samples, strict=True)), "merged": share})  # fmt: skip
    return rows


def _stored_share(text: Any) -> dict[str, Any] | None:
    """A stored share (JSON the fold wrote: orjson reads it; anything else, the lenient way)."""
    try:
        value = orjson.loads(text) if isinstance(text, str) else text
    except orjson.JSONDecodeError:
        return _json_object(text)
    return value if isinstance(value, dict) else None


def _dumps(value: Any) -> str:
    """JSON text (orjson, or the standard library for integers past 64 bits, which orjson refuses)."""
    return jsonio.dumps(value).decode()


_PG_SHARES_SQL = text(
    "INSERT INTO rollout_device_sums (rollout_id, wave_index, cohort, bundle_version, device_id, requests,"
    " shadow_samples, generations, merged) SELECT r, w, c, v, d, requests, shadow_samples, generations, merged"
    " FROM json_to_recordset(CAST(:rows AS json)) AS u(r integer, w integer, c text, v integer, d text,"
    " requests float8, shadow_samples float8, generations float8, merged json)"
    " ON CONFLICT (rollout_id, wave_index, cohort, bundle_version, device_id) DO UPDATE SET"
    " requests = excluded.requests, shadow_samples = excluded.shadow_samples, generations = excluded.generations,"
    " merged = excluded.merged"
)


def _serialized(session: Session, rows: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """The shares' rows as JSON before any write: one parameter on PostgreSQL, each row's sum on SQLite."""
    if rows and session.get_bind().dialect.name == "postgresql":
        return _dumps(rows)
    return [{**row, "merged": _dumps(row["merged"])} for row in rows]


def _write_shares(session: Session, rows: str | list[dict[str, Any]]) -> None:
    """Store the devices' shares: one statement on PostgreSQL (the rows as one JSON parameter), an executemany of
    upserts on SQLite."""
    if isinstance(rows, str):
        session.execute(_PG_SHARES_SQL, {"rows": rows})
        return
    if not rows:
        return
    table = typing.cast(Table, RolloutDeviceSum.__table__)
    names = {"rollout_id": "r", "wave_index": "w", "cohort": "c", "bundle_version": "v", "device_id": "d"}
    statement = sqlite_insert(table).values(
        {**{column: bindparam(name) for column, name in names.items()},
         **{name: bindparam(name) for name in ("requests", "shadow_samples", "generations")},
         "merged": bindparam("merged", type_=Text)})  # fmt: skip
    samples = ("requests", "shadow_samples", "generations", "merged")
    statement = statement.on_conflict_do_update(
        index_elements=list(names), set_={name: statement.excluded[name] for name in samples}
    )
    session.execute(statement, rows)


_PG_EVIDENCE_SQL = text(
    "UPDATE rollout_devices AS t SET evidence = u.evidence, running_since = to_timestamp(u.running_since),"
    " last_report_at = to_timestamp(u.last_report_at), last_on_target_at = to_timestamp(u.last_on_target_at),"
    " left_target_at = to_timestamp(u.left_target_at), failure = u.failure, evidence_seq = u.evidence_seq"
    " FROM json_to_recordset(CAST(:rows AS json)) AS u(r integer, d text, evidence json, running_since float8,"
    " last_report_at float8, last_on_target_at float8, left_target_at float8, failure text, evidence_seq integer)"
    " WHERE t.rollout_id = u.r AND t.device_id = u.d"
)
"""One statement, one parameter: the rows as a JSON array (times as epoch seconds), which orjson writes in one
call, where per-column arrays cost a Python conversion per value."""
SUMMARY = ("running_since", "last_report_at", "last_on_target_at", "left_target_at", "failure")


def _write_evidence(session: Session, members: list[_Member]) -> None:
    """Store the changed evidence and its summary: one statement on PostgreSQL, one executemany on SQLite."""
    if not members:
        return
    postgresql = session.get_bind().dialect.name == "postgresql"
    rows = []
    for member in members:
        evidence = member.loaded_evidence()
        summary = (evidence.stamps if postgresql else evidence.summary)(member.target, member.shadow)
        rows.append({"r": member.rollout_id, "d": member.device_id, "evidence": evidence.to_json(),
                     "evidence_seq": member.stamp, **summary})  # fmt: skip
    if postgresql:  # times as epoch seconds (finite: plain JSON)
        session.execute(_PG_EVIDENCE_SQL, {"rows": orjson.dumps(rows).decode()})
        return
    for row in rows:  # serialized here, before the statement takes the write lock
        row["evidence"] = orjson.dumps(row["evidence"]).decode()
    table = typing.cast(Table, RolloutDevice.__table__)
    values: dict[str, Any] = {name: bindparam(name) for name in ("evidence_seq", *SUMMARY)}
    statement = (
        update(table)
        .where(table.c.rollout_id == bindparam("r"), table.c.device_id == bindparam("d"))
        .values({**values, "evidence": bindparam("evidence", type_=Text)})  # the JSON text as it is
    )
    session.execute(statement, rows)


__all__ = [
    "CONTROL",
    "ENGINE_LOCK",
    "WAVE",
    "FoldReport",
    "fold_chunk",
    "fold_pending",
    "events_by_id",
    "unfolded_events",
    "unfolded_windows",
    "windows_by_id",
]

"""What the fold has left to add is queued on insert, and the fold reads and clears that queue without scanning
stored telemetry (a scan of every stored window cost 90 ms a chunk at 300,000 windows)."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.models import DeviceEvent, MetricWindow
from fleet_server.rollouts.fold import events_by_id, fold_pending, unfolded_events, unfolded_windows, windows_by_id
from fleet_server.rollouts.models import UnfoldedEvent, UnfoldedWindow

T = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def _plan(engine: sa.Engine, query: sa.Select) -> str:
    with engine.begin() as connection:
        sql = str(query.compile(connection, compile_kwargs={"literal_binds": True}))
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")  # the plan an index can give
            return " ".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {sql}"))
        return " ".join(row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))


@pytest.mark.parametrize("kind", ["windows", "events"])
def test_the_fold_reads_its_queue_in_order_then_looks_the_rows_up_by_primary_key(db_engine: sa.Engine, kind) -> None:
    queue, rows, table = {"windows": (unfolded_windows, windows_by_id, "metric_windows"),
                          "events": (unfolded_events, events_by_id, "device_events")}[kind]  # fmt: skip
    with Session(db_engine) as session:
        plans = _plan(db_engine, queue(500)), _plan(db_engine, rows(session, [3, 1, 2]))
    if db_engine.dialect.name == "postgresql":
        assert f"pk_unfolded_{kind}" in plans[0] and "Sort" not in plans[0], plans[0]
        assert f"pk_{table}" in plans[1] and f"Seq Scan on {table}" not in plans[1], plans[1]
    else:
        assert plans[0] == f"SCAN unfolded_{kind}", plans[0]  # in rowid order: no sort
        assert f"SEARCH {table} USING INTEGER PRIMARY KEY" in plans[1], plans[1]


def _window(device_id: str) -> dict:
    return {"batch_pk": 0, "device_id": device_id, "model_name": "digits", "bundle_version": 1, "window_start": T,
            "window_end": T + dt.timedelta(minutes=1), "payload": {"counters": {"requests": 1}}}  # fmt: skip


def _event(kind: str, folded: bool) -> dict:
    return {"batch_pk": 0, "device_id": "d1", "type": kind, "model_name": "digits", "bundle_version": 1, "at": T,
            "payload": {"type": kind}, "folded": folded}  # fmt: skip


def _queued(factory: sessionmaker[Session]) -> tuple[list[int], list[int]]:
    with factory() as session:
        windows = list(session.scalars(sa.select(UnfoldedWindow.window_id).order_by(UnfoldedWindow.window_id)))
        return windows, list(session.scalars(sa.select(UnfoldedEvent.event_id).order_by(UnfoldedEvent.event_id)))


def test_every_stored_window_and_every_event_the_engine_reads_is_queued_whoever_writes_it(
    db_engine: sa.Engine,
) -> None:
    factory = sessionmaker(db_engine)
    with db_engine.begin() as connection:  # plain SQL inserts, as a bulk import would write them
        windows = connection.execute(sa.insert(MetricWindow).returning(MetricWindow.id),
                                     [_window("d1"), _window("d2")]).scalars().all()  # fmt: skip
        read = connection.execute(sa.insert(DeviceEvent).returning(DeviceEvent.id), [_event("heartbeat", False)])
        read_ids = read.scalars().all()
        connection.execute(sa.insert(DeviceEvent), [_event("inference_error", True)])
    assert _queued(factory) == (sorted(windows), list(read_ids))


def test_a_fold_empties_the_queue_even_of_rows_purged_before_it_ran(db_engine: sa.Engine) -> None:
    factory = sessionmaker(db_engine)
    with db_engine.begin() as connection:
        ids = connection.execute(sa.insert(MetricWindow).returning(MetricWindow.id),
                                 [_window("d1"), _window("d2")]).scalars().all()  # fmt: skip
        connection.execute(sa.delete(MetricWindow).where(MetricWindow.id == min(ids)))  # retention ran first
    report = fold_pending(factory)
    assert report.windows == 2 and report.invalid_windows == 0  # no rollout: nothing to add, nothing refused
    assert _queued(factory) == ([], [])
    assert fold_pending(factory).chunks == 0

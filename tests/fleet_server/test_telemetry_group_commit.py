"""Telemetry group commit: uploads that arrive together share one statement, each answered after its commit,
stored exactly once, and a batch the database refuses fails alone.

The committer itself is PostgreSQL's (SQLite stores each upload in its own transaction); the last test
sends simultaneous uploads and retries to a live server on both databases.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from fleet_server.services import telemetry_group_commit as group_commit
from fleet_server.services.async_pg import AsyncPgPool, conninfo_for
from fleet_server.services.telemetry_group_commit import GroupCommitter
from fleet_server.services.telemetry_intake import IntakeResult, batch_rows, parse_batch

AT = "2026-11-29T12:00:00+00:00"
AT_END = "2026-11-29T12:01:00+00:00"


def batch_body(batch_id: str, n_samples: int = 2) -> dict[str, Any]:
    return {
        "batch_id": batch_id,
        "events": [{"id": "e1", "type": "heartbeat", "at": AT, "model": None, "version": None, "uptime_s": 5}],
        "windows": [{"id": "w1", "model": "digits", "version": 3, "start": AT, "end": AT_END,
                     "counters": {"requests": 60}}],
        "samples": [{"id": f"s{i}", "at": AT, "model": "digits", "version": 3, "capture_reason": "rate",
                     "inclusion_probability": 0.01, "inputs": {}} for i in range(n_samples)],
    }  # fmt: skip


def checked_rows(device_id: str, batch_id: str, n_samples: int = 2) -> dict[str, list[dict[str, Any]]]:
    return batch_rows(parse_batch(json.dumps(batch_body(batch_id, n_samples)).encode(), 1000), device_id)


TABLES = ("telemetry_batches", "device_events", "metric_windows", "prediction_samples")


def stored(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {t: connection.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}  # noqa: S608


def count_statements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of uploads in each group statement the committer sends (a list that grows)."""
    sizes: list[int] = []
    real = group_commit.run_query

    async def counting(connection: Any, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        if sql == group_commit.GROUP_STORE_SQL:
            sizes.append(len(params["k"]))
        return await real(connection, sql, params)

    monkeypatch.setattr(group_commit, "run_query", counting)
    return sizes


async def store_all(committer: GroupCommitter, uploads: list[tuple[str, str, dict[str, Any]]]) -> list[Any]:
    return await asyncio.gather(*(committer.store(d, b, rows, 100) for d, b, rows in uploads), return_exceptions=True)


ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@ON_POSTGRESQL
def test_uploads_arriving_together_share_one_statement_and_each_is_answered_only_once_committed(
    db_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = count_statements(monkeypatch)
    committed_at_answer: list[bool] = []

    async def upload_and_look(committer: GroupCommitter, device_id: str, batch_id: str) -> IntakeResult:
        result = await committer.store(device_id, batch_id, checked_rows(device_id, batch_id), 100)
        with db_engine.connect() as other:  # another connection sees only committed rows
            row = other.execute(sa.text("SELECT count(*) FROM telemetry_batches WHERE batch_id = :b"), {"b": batch_id})
            committed_at_answer.append(row.scalar_one() == 1)
        return result

    async def main() -> list[IntakeResult]:
        pool = AsyncPgPool(conninfo_for(db_engine))
        committer = GroupCommitter(pool)
        try:
            return await asyncio.gather(*(upload_and_look(committer, f"dev-{i}", uuid.uuid4().hex) for i in range(12)))
        finally:
            await pool.close()

    results = asyncio.run(main())
    assert all(r == IntakeResult({"events": 1, "windows": 1, "samples": 2}, False) for r in results)
    assert committed_at_answer == [True] * 12
    assert sizes[0] == 12 and sum(sizes) == 12
    assert stored(db_engine) == {"telemetry_batches": 12, "device_events": 12, "metric_windows": 12,
                                 "prediction_samples": 24}  # fmt: skip


@ON_POSTGRESQL
def test_a_batch_the_database_refuses_fails_alone_and_the_rest_of_its_group_is_stored(
    db_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = count_statements(monkeypatch)
    uploads = [(f"dev-{i}", uuid.uuid4().hex, checked_rows(f"dev-{i}", f"b{i}")) for i in range(5)]
    uploads[2][2]["windows"][0]["payload"] = "{not json"  # past intake's checks; PostgreSQL's json refuses it

    async def main() -> list[Any]:
        pool = AsyncPgPool(conninfo_for(db_engine))
        try:
            return await store_all(GroupCommitter(pool), uploads)
        finally:
            await pool.close()

    results = asyncio.run(main())
    assert [type(r).__name__ for r in results] == ["IntakeResult"] * 2 + ["InvalidTextRepresentation"] + [
        "IntakeResult"
    ] * 2
    assert sizes == [5, 1, 1, 1, 1, 1]  # the group, then each alone
    assert stored(db_engine)["telemetry_batches"] == 4 and stored(db_engine)["metric_windows"] == 4


@ON_POSTGRESQL
def test_the_same_batch_twice_in_one_turn_and_again_later_is_stored_once(
    db_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = count_statements(monkeypatch)
    same = ("dev-1", "batch-1", checked_rows("dev-1", "batch-1", 3))
    others = [(f"dev-{i}", "batch-1", checked_rows(f"dev-{i}", "batch-1")) for i in range(2, 5)]

    async def main() -> tuple[list[Any], list[Any]]:
        pool = AsyncPgPool(conninfo_for(db_engine))
        committer = GroupCommitter(pool)
        try:
            together = await store_all(committer, [same, *others, same])
            later = await store_all(committer, [same])
            return together, later
        finally:
            await pool.close()

    together, later = asyncio.run(main())
    accepted = {"events": 1, "windows": 1, "samples": 3}
    assert together[0] == IntakeResult(accepted, False) and together[-1] == IntakeResult(accepted, True)
    assert later == [IntakeResult(accepted, True)]
    assert sizes == [4, 1, 1]  # the second copy waited for the next statement
    assert stored(db_engine) == {"telemetry_batches": 4, "device_events": 4, "metric_windows": 4,
                                 "prediction_samples": 3 + 3 * 2}  # fmt: skip


@ON_POSTGRESQL
def test_uploads_waiting_when_the_database_is_unreachable_get_its_error_and_a_later_upload_is_stored(
    db_engine: sa.Engine,
) -> None:
    async def main() -> tuple[list[Any], IntakeResult]:
        good = AsyncPgPool(conninfo_for(db_engine))
        committer = GroupCommitter(AsyncPgPool("postgresql://nobody@127.0.0.1:1/none"))
        failed = await store_all(committer, [(f"dev-{i}", "b", checked_rows(f"dev-{i}", "b")) for i in range(3)])
        committer.pool = good
        try:
            return failed, await committer.store("dev-9", "b", checked_rows("dev-9", "b"), 100)
        finally:
            await good.close()

    failed, later = asyncio.run(main())
    assert [type(error).__name__ for error in failed] == ["OperationalError"] * 3
    assert later.duplicate is False and stored(db_engine)["telemetry_batches"] == 1


def test_simultaneous_uploads_and_retries_to_a_live_server_store_each_batch_once(
    live_server: str, make_device: Any, db_engine: sa.Engine
) -> None:
    devices = [make_device() for _ in range(4)]
    sends = [(d, f"batch-{d.device_id[-6:]}-{n}") for d in devices for n in range(4)] * 2  # every batch twice

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live_server, timeout=30) as http:
            return await asyncio.gather(*(http.post("/api/v1/device/telemetry", headers=d.headers,
                                                    json=batch_body(b)) for d, b in sends))  # fmt: skip

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 32
    answers = [r.json() for r in responses]
    assert sum(not a["duplicate"] for a in answers) == 16
    assert all(a["accepted"] == {"events": 1, "windows": 1, "samples": 2} for a in answers)
    assert stored(db_engine) == {"telemetry_batches": 16, "device_events": 16, "metric_windows": 16,
                                 "prediction_samples": 32}  # fmt: skip

"""No stored row can turn a telemetry read into a 500 (issue 15: ``1e309``, NaN, 10^400 and text histogram counts
stored in windows made ``/telemetry/cohort`` and ``/telemetry/summary`` answer 500).

Intake refuses such windows now, but rows stored before it checked them (or written past it) stay in the
database. Here they are written straight into it as JSON text, beside two devices' windows sent through the real
device API; every aggregate read (summary by version, device, fleet and variant, cohort, drift) must answer 200
with the good windows' figures and the bad ones counted as ``invalid_windows``, on SQLite and PostgreSQL. Stored
samples of any shape (not an object, a lone surrogate, NaN, text where a number goes, 5,000 digits) are listed
and exported.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from tests.fleet_server.telemetry.test_query import post

START = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(minutes=10)
SINCE = (START - dt.timedelta(minutes=5)).isoformat()
POISONED = {  # payload texts of windows that break the window contract
    "infinite count": '{"counters": {"requests": 1e309}}',
    "NaN count": '{"counters": {"requests": NaN}}',
    "count of 401 digits": '{"counters": {"requests": 1' + "0" * 400 + "}}",
    "text histogram count": '{"counters": {"requests": 3}, "latency_ms": {"counts": [1, "2", 3]}}',
    "count past the 4,300-digit limit": '{"counters": {"requests": 1' + "0" * 5000 + "}}",
    "nested 3,000 deep": '{"counters": {"requests": 3}, "x": ' + "[" * 3000 + "]" * 3000 + "}",
    "not an object": "[1, 2, 3]",
    "lone surrogate in a name": '{"counters": {"requests": 3}, "features": {"f\\ud800": [1, 2]}}',
}


def good_window(requests: int, errors: int) -> dict:
    return {"id": uuid.uuid4().hex, "model": "digits", "version": 2, "start": START.isoformat(),
            "end": (START + dt.timedelta(minutes=1)).isoformat(),
            "counters": {"requests": requests, "rows": requests, "errors": errors}}  # fmt: skip


def store_past_intake(engine: sa.Engine, device_id: str, table: str, payload: str) -> bool:
    """Write one row whose payload is this JSON text; False if the database itself refuses the text."""
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO telemetry_batches (device_id, batch_id, received_at, events,"
                                       " windows, samples, size_bytes) VALUES (:d, :b, :t, 1, 1, 0, 1)"),
                               {"d": device_id, "b": uuid.uuid4().hex, "t": START})  # fmt: skip
            pk = connection.execute(sa.text("SELECT max(id) FROM telemetry_batches")).scalar_one()
            values = {"pk": pk, "d": device_id, "s": START, "e": START + dt.timedelta(minutes=1), "p": payload}
            if table == "metric_windows":
                sql = ("INSERT INTO metric_windows (batch_pk, device_id, model_name, bundle_version, window_start,"
                       " window_end, payload) VALUES (:pk, :d, 'digits', 2, :s, :e, :p)")  # fmt: skip
            elif table == "device_events":
                sql = ("INSERT INTO device_events (batch_pk, device_id, type, model_name, bundle_version, at, payload,"
                       " folded) VALUES (:pk, :d, 'install', 'digits', 2, :s, :p, true)")  # fmt: skip
            else:
                sql = ("INSERT INTO prediction_samples (batch_pk, device_id, model_name, bundle_version, reason, at,"
                       " payload) VALUES (:pk, :d, 'digits', 2, 'rate', :s, :p)")  # fmt: skip
            connection.execute(sa.text(sql), values)
    except DBAPIError:
        return False
    return True


@pytest.fixture
def poisoned(client, make_device, db_engine):
    """Two devices' good windows (200 requests, 20 errors) and, from the second, every poisoned window stored."""
    a, b = make_device(), make_device()
    post(client, a, windows=[good_window(100, 10)])
    post(client, b, windows=[good_window(100, 10)])
    stored = [name for name, text in POISONED.items() if store_past_intake(db_engine, b.device_id, "metric_windows",
                                                                           text)]  # fmt: skip
    for text in ('{"result": "installed", "variant": 1' + "0" * 5000 + "}", "[1]", '{"variant": "x", "n": NaN}'):
        store_past_intake(db_engine, b.device_id, "device_events", text)
    return a, b, stored


def test_stored_windows_that_break_the_contract_are_left_out_of_every_summary_and_counted(
    client, admin_headers, poisoned, db_engine
):
    _, _, stored = poisoned
    if db_engine.dialect.name == "postgresql":  # its json type refuses NaN itself: that one never gets stored
        assert "NaN count" not in stored
    assert len(stored) >= len(POISONED) - 1
    for by in ("version", "device", "fleet", "variant"):
        response = client.get("/api/v1/admin/telemetry/summary", headers=admin_headers,
                              params={"model": "digits", "since": SINCE, "by": by})  # fmt: skip
        assert response.status_code == 200, (by, response.text[:300])
        rows = response.json()
        assert sum(row["requests"] for row in rows) == 200 and sum(row["errors"] for row in rows) == 20, by
        assert sum(row["invalid_windows"] for row in rows) == len(stored), by


def test_a_cohort_and_drift_over_stored_bad_windows_answer_with_the_good_ones(client, admin_headers, poisoned):
    a, b, stored = poisoned
    cohort = client.get("/api/v1/admin/telemetry/cohort", headers=admin_headers,
                        params={"model": "digits", "version": 2, "device_id": [a.device_id, b.device_id],
                                "since": SINCE})  # fmt: skip
    assert cohort.status_code == 200, cohort.text[:300]
    assert cohort.json()["requests"] == 200 and cohort.json()["error_rate"] == 0.1
    assert cohort.json()["invalid_windows"] == len(stored)
    drift = client.get("/api/v1/admin/drift/digits", headers=admin_headers, params={"since": SINCE})
    assert drift.status_code == 200, drift.text[:300]


def test_stored_samples_of_any_shape_are_listed_and_exported(client, admin_headers, make_device, db_engine):
    device = make_device()
    payloads = ["[1, 2]", '{"inputs": {"x": "worn \\udfff"}, "latency_ms": {"a": 1}, "redacted": "f1", "id": 7}',
                '{"inputs": [NaN], "confidence": "high", "source": 3}', '{"outputs": 1' + "0" * 5000 + "}"]  # fmt: skip
    stored = sum(store_past_intake(db_engine, device.device_id, "prediction_samples", text) for text in payloads)
    listed = client.get("/api/v1/admin/telemetry/samples", headers=admin_headers, params={"model": "digits"})
    assert listed.status_code == 200, listed.text[:300]
    assert len(listed.json()) == stored
    exported = client.get("/api/v1/admin/telemetry/samples.parquet", headers=admin_headers, params={"model": "digits"})
    assert exported.status_code == 200, exported.text[:300]

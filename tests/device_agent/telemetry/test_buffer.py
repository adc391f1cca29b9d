"""The offline buffer: two weeks offline under the 50 MB cap, priorities, drop accounting, idempotent batches.

The two-week stream is built from a real window and a real sample recorded through the serving
pipeline on a 64-feature, 10-class ONNX model (a digits-sized model), replayed with fresh ids and
times for every minute of 14 days at 1 request/s with the default settings.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles.testing import build_bundle_dir
from device_agent.inference import LocalEngine
from device_agent.serving import ServingConfig, ServingPipeline
from device_agent.telemetry.buffer import SCHEMA_VERSION, TelemetryBuffer
from device_agent.telemetry.events import install_event, make_event
from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings

DAYS = 14
REQUESTS_PER_S = 1.0
CAP_BYTES = 50_000_000


@pytest.fixture(scope="module")
def real_items(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real one-minute window (60 requests) and one real routine sample of a digits-sized model."""
    root = tmp_path_factory.mktemp("digits")
    build_bundle_dir(root / "bundle", name="digits", n_features=64, n_classes=10)
    engine = LocalEngine()
    engine.load("digits", root / "bundle", "onnx-fp32")
    buffer = TelemetryBuffer(root / "t.db", CAP_BYTES)
    recorder = TelemetryRecorder(buffer, TelemetrySettings(sample_rate=1.0, reservoir_size=1), rng=random.Random(3))
    pipeline = ServingPipeline(engine, ServingConfig(enforce_deadlines=False), recorder)
    rng = np.random.default_rng(0)
    for _ in range(60):
        pipeline.predict("digits", {"x": rng.uniform(-2, 2, (1, 64)).astype(np.float32)})
    recorder.flush()
    batch = buffer.next_batch()
    assert batch is not None and len(batch.windows) == 1 and len(batch.samples) == 1
    return {"window": batch.windows[0], "sample": batch.samples[0]}


def fresh(item: dict[str, Any], at: dt.datetime, **changes: Any) -> bytes:
    copy = {**item, "id": uuid.uuid4().hex, **changes}
    for key in ("at", "start"):
        if key in copy:
            copy[key] = at.isoformat()
    if "end" in copy:
        copy["end"] = (at + dt.timedelta(minutes=1)).isoformat()
    return zlib.compress(json.dumps(copy, separators=(",", ":")).encode(), 6)


def two_weeks(real: dict[str, Any], sample_rate: float) -> list[list[tuple[str, str, bytes]]]:
    """Per hour of 14 days: 60 windows, the routine samples, a heartbeat every 5 min; installs and errors daily.

    Each day's windows and samples are one real item compressed with that day's id and time (ids and
    times change a compressed item by a few bytes, and compressing 30 000 items would dominate the test).
    """
    start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    samples_per_hour = 3600 * REQUESTS_PER_S * sample_rate
    hours: list[list[tuple[str, str, bytes]]] = []
    carry = 0.0
    for hour in range(DAYS * 24):
        at = start + dt.timedelta(hours=hour)
        if hour % 24 == 0:
            window, sample = fresh(real["window"], at), fresh(real["sample"], at)
        items = [("window", "window", window)] * 60
        carry += samples_per_hour
        while carry >= 1.0:
            items.append(("sample", "rate", sample))
            carry -= 1.0
        heartbeat = make_event("heartbeat", uptime_s=hour * 3600.0, models=[], buffer={})
        items += [("event", "heartbeat", zlib.compress(json.dumps(heartbeat).encode()))] * 12
        if hour % 24 == 0:
            install = install_event("digits", 2 + hour // 24, "installed", from_version=1 + hour // 24)
            items.append(("event", "install", zlib.compress(json.dumps(install).encode())))
            error = fresh(real["sample"], at, capture_reason="error", inclusion_probability=1.0)
            items.append(("sample", "error", error))
        hours.append(items)
    return hours


def fill(buffer: TelemetryBuffer, hours: list[list[tuple[str, str, bytes]]]) -> None:
    for items in hours:
        buffer.put_many(items)


@pytest.fixture(scope="module")
def stream(real_items: dict[str, Any]) -> list[list[tuple[str, str, bytes]]]:
    return two_weeks(real_items, TelemetrySettings().sample_rate)


def test_two_weeks_offline_at_one_request_per_second_fit_in_50_mb(
    tmp_path: Path, stream: list[list[tuple[str, str, bytes]]]
) -> None:
    settings = TelemetrySettings()
    buffer = TelemetryBuffer(tmp_path / "t.db", settings.buffer_cap_bytes)
    fill(buffer, stream)

    held = buffer.count_by_label()
    assert buffer.drops() == {}
    assert held == {
        "window:window": DAYS * 24 * 60,
        "sample:rate": int(DAYS * 86400 * REQUESTS_PER_S * settings.sample_rate),
        "sample:error": DAYS,
        "event:install": DAYS,
        "event:heartbeat": 1,  # coalesced: only the newest heartbeat is kept
    }
    assert buffer.disk_bytes() <= CAP_BYTES


def test_a_full_buffer_drops_routine_samples_first_compacts_windows_and_keeps_every_install_and_error(
    tmp_path: Path, stream: list[list[tuple[str, str, bytes]]]
) -> None:
    days = 4
    buffer = TelemetryBuffer(tmp_path / "t.db", cap_bytes=2_000_000)
    fill(buffer, stream[: 24 * days])
    sent: dict[str, int] = {}
    for items in stream[: 24 * days]:
        for kind, label, _ in items:
            sent[f"{kind}:{label}"] = sent.get(f"{kind}:{label}", 0) + 1

    held = buffer.count_by_label()
    assert held["event:install"] == days and held["sample:error"] == days  # priority 0: all kept
    assert held.get("sample:rate", 0) < sent["sample:rate"] / 4  # routine samples went first (the newest stay)
    assert held.get("window:hour", 0) > 0 and buffer.compacted > 0  # old minutes merged into hours ...
    assert buffer.disk_bytes() <= 2_000_000

    dropped = buffer.drops()
    assert dropped == {"sample:cap": sent["sample:rate"] - held.get("sample:rate", 0)}  # ... so no window was lost

    batch = buffer.next_batch(max_items=100_000, max_bytes=10**9)
    assert batch is not None
    report = next(e for e in batch.events if e["type"] == "drops")
    assert report["dropped"] == dropped  # reported to the server with the next batch
    assert buffer.drops() == {}
    assert len([e for e in batch.events if e["type"] == "install"]) == days
    requests = sum(w["counters"]["requests"] for w in batch.windows)
    assert requests == sent["window:window"] * 60  # every request of two weeks is still counted
    assert batch.events[0]["type"] in ("install", "drops")  # priority 0 leaves first


def test_without_compaction_the_oldest_windows_are_dropped_and_counted(
    tmp_path: Path, stream: list[list[tuple[str, str, bytes]]]
) -> None:
    buffer = TelemetryBuffer(tmp_path / "t.db", cap_bytes=1_000_000, compact=None)
    fill(buffer, stream[: 24 * 2])
    held = buffer.count_by_label()
    sent_windows = 24 * 2 * 60
    assert held["event:install"] == 2 and 0 < held["window:window"] < sent_windows
    assert buffer.drops()["window:cap"] == sent_windows - held["window:window"]
    assert buffer.disk_bytes() <= 1_000_000


def test_a_batch_keeps_its_id_and_items_until_acknowledged(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path / "t.db", cap_bytes=1_000_000)
    for i in range(5):
        buffer.put("event", "error", make_event("error", error="X", message=str(i)))
    first = buffer.next_batch(max_items=3)
    again = buffer.next_batch(max_items=3)
    assert first is not None and again is not None
    assert again.batch_id == first.batch_id and again.events == first.events and len(first) == 3
    assert buffer.ack(first.batch_id) == 3
    rest = buffer.next_batch(max_items=3)
    assert rest is not None and rest.batch_id != first.batch_id and len(rest) == 2


def test_the_buffer_survives_a_restart(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path / "t.db", cap_bytes=1_000_000)
    buffer.put("event", "install", install_event("m", 2, "failed", reason="self-test failed"))
    in_flight = buffer.next_batch()
    buffer.close()
    reopened = TelemetryBuffer(tmp_path / "t.db", cap_bytes=1_000_000)
    again = reopened.next_batch()
    assert in_flight is not None and again is not None and again.batch_id == in_flight.batch_id
    assert reopened.stats()["bytes"] > 0


def test_a_rejected_batch_is_dropped_and_counted(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path / "t.db", cap_bytes=1_000_000)
    buffer.put("window", "window", {"id": "w", "counters": {}})
    batch = buffer.next_batch()
    assert batch is not None
    buffer.reject(batch.batch_id, "rejected")
    assert buffer.drops() == {"window:rejected": 1} and buffer.stats()["items"] == 0


SCHEMA_0 = """
CREATE TABLE items (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, label TEXT NOT NULL,
                    priority INTEGER NOT NULL, size_bytes INTEGER NOT NULL, body BLOB NOT NULL, batch_id TEXT);
CREATE INDEX ix_items_evict ON items (priority, seq);
CREATE INDEX ix_items_label ON items (label);
CREATE TABLE drops (label TEXT PRIMARY KEY, items INTEGER NOT NULL, size_bytes INTEGER NOT NULL);
CREATE TABLE checkpoints (owner TEXT NOT NULL, key TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (owner, key));
"""


def test_a_buffer_file_of_the_first_schema_is_migrated_in_place_and_keeps_its_batch_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    body = zlib.compress(json.dumps(install_event("m", 2, "installed")).encode())
    with sqlite3.connect(path) as db:  # an agent before strikes: one item, handed out as batch "b1"
        db.executescript(SCHEMA_0)
        db.execute("INSERT INTO items (kind, label, priority, size_bytes, body, batch_id) "
                   "VALUES ('event', 'install', 0, ?, ?, 'b1')", (len(body), body))  # fmt: skip
    db.close()
    buffer = TelemetryBuffer(path, cap_bytes=1_000_000)
    batch = buffer.next_batch()
    assert batch is not None and batch.batch_id == "b1" and batch.events[0]["type"] == "install"
    assert buffer.strike("b1") == 1
    buffer.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT strikes FROM items WHERE batch_id = 'b1'").fetchone()[0] == 1
    db.close()
    reopened = TelemetryBuffer(path, cap_bytes=1_000_000)  # migrating twice changes nothing
    assert reopened.strike("b1") == 2 and reopened.stats()["items"] == 1


def test_a_held_back_batch_keeps_its_items_while_the_next_batch_is_handed_out(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path / "t.db", cap_bytes=1_000_000)
    for i in range(6):
        buffer.put("event", "error", make_event("error", error="X", message=str(i)))
    head = buffer.next_batch(max_items=3)
    assert head is not None
    probe = buffer.next_batch(max_items=3, exclude={head.batch_id})
    assert probe is not None and probe.batch_id != head.batch_id
    assert {e["message"] for e in head.events}.isdisjoint(e["message"] for e in probe.events) and len(probe) == 3
    again, probe_again = buffer.next_batch(max_items=3), buffer.next_batch(max_items=3, exclude={head.batch_id})
    assert again is not None and again.batch_id == head.batch_id  # the oldest batch in flight first
    assert probe_again is not None and probe_again.batch_id == probe.batch_id
    assert buffer.strike(head.batch_id) == 1 and buffer.strike(head.batch_id) == 2
    buffer.reject(head.batch_id, "server_error")
    assert buffer.drops() == {"event:server_error": 3}


def test_items_released_by_shrink_lose_their_batch_strikes(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path / "t.db", cap_bytes=1_000_000)
    for i in range(4):
        buffer.put("event", "error", make_event("error", error="X", message=str(i)))
    batch = buffer.next_batch()
    assert batch is not None and buffer.strike(batch.batch_id) == 1
    assert buffer.shrink(batch.batch_id, 2) == 2
    fresh = buffer.next_batch(exclude={batch.batch_id})
    assert fresh is not None and len(fresh) == 2 and buffer.strike(fresh.batch_id) == 1

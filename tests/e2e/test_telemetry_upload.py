"""A device's telemetry over real HTTP: an answer lost in transit, a retried batch counted once, a batch
the server fails on (an injected intake bug) dropped after three strikes while everything else arrives.

The device is the real agent stack (serving pipeline on a real ONNX bundle, recorder, SQLite buffer,
uploader over httpx); the server is the real app under uvicorn on loopback (the fleet-server test
fixtures, on SQLite and PostgreSQL). The transport forwards the first upload to the server and then
loses its answer, as a dropped connection would.
"""

from __future__ import annotations

import datetime as dt
import json

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.events import make_event
from device_agent.telemetry.sampling import Candidate, sample_record
from device_agent.telemetry.uploader import MAX_STRIKES, TelemetryUploader
from fleet_server.db import session_scope
from fleet_server.models import DeviceEvent, MetricWindow, PredictionSample, TelemetryBatch
from fleet_server.telemetry.query import cohort_stats
from tests.fleet_server.conftest import (  # noqa: F401 - fixtures
    admin_headers,
    app,
    client,
    database_url,
    db_engine,
    live_server,
    make_api_key,
    make_device,
    make_enroll_token,
    online_keys,
    release,
    session_factory,
    settings,
)
from tests.fleet_server.telemetry.helpers import simulate, uniform

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


class LosesFirstAnswer(httpx.HTTPTransport):
    """Delivers every request; the first answer never reaches the device (a read timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        response.read()
        self.delivered += 1
        if self.delivered == 1:
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


@pytest.mark.usefixtures("live_server", "release", "make_device", "session_factory")
def test_a_retried_batch_after_a_lost_answer_is_counted_once(request, tmp_path):
    server_url, publisher = request.getfixturevalue("live_server"), request.getfixturevalue("release")
    enroll, sessions = request.getfixturevalue("make_device"), request.getfixturevalue("session_factory")
    publisher.publish("tiny", 1)
    device = enroll()
    buffer = simulate(publisher.work_dir / "tiny-1", tmp_path, uniform(300, 9), NOW - dt.timedelta(minutes=10),
                      sample_rate=0.1)  # fmt: skip
    held = buffer.count_by_label()
    transport = LosesFirstAnswer()
    clock = [0.0]
    with httpx.Client(base_url=server_url, transport=transport, timeout=10) as http:
        uploader = TelemetryUploader(buffer, http, lambda: device.headers, clock=lambda: clock[0])
        assert uploader.maybe_drain() is None  # the answer was lost: the batch stays, backoff starts
        assert uploader.failures == 1 and uploader.next_attempt_at >= 2.5
        assert uploader.maybe_drain() is None  # still backing off: nothing sent
        assert transport.delivered == 1
        clock[0] = uploader.next_attempt_at
        report = uploader.maybe_drain()

    assert report is not None and report.duplicates == 1 and transport.delivered == 2
    assert buffer.stats()["items"] == 0
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count()).select_from(TelemetryBatch)) == 1
        assert session.scalar(select(func.count()).select_from(MetricWindow)) == held["window:window"]
        assert session.scalar(select(func.count()).select_from(PredictionSample)) == held["sample:rate"]
        stats = cohort_stats(session, "tiny", 1, [device.device_id], NOW - dt.timedelta(hours=1))
    assert stats.requests == 300 and stats.devices_reporting == 1 and stats.errors == 0
    assert stats.psi_max_input is not None and stats.psi_max_input < 0.25


@pytest.mark.usefixtures("live_server", "release", "make_device", "session_factory")
def test_samples_over_the_servers_body_limit_as_one_batch_all_arrive_in_several(request, tmp_path):
    """Samples that compress well make a batch small on the wire (the buffer's measure) but over the
    server's 4 MiB limit once decompressed; the uploader halves it before sending, so nothing is refused."""
    server_url, publisher = request.getfixturevalue("live_server"), request.getfixturevalue("release")
    enroll, sessions = request.getfixturevalue("make_device"), request.getfixturevalue("session_factory")
    publisher.publish("tiny", 1)
    device = enroll()
    buffer = TelemetryBuffer(tmp_path / "big.db", 50_000_000)
    image = {"x": np.zeros((1, 60_000), dtype=np.float32)}  # logged in full: max_values below is above its size
    for i in range(24):
        at = (NOW - dt.timedelta(seconds=i)).timestamp()
        candidate = Candidate(at, "tiny", 1, "rate", image, {"label": np.array(["c0"])}, "local", 1.0,
                              None, None, None)  # fmt: skip
        buffer.put("sample", "rate", sample_record(candidate, 0.01, {}, max_values=100_000))
    first = buffer.next_batch()
    assert first is not None and len(first) == 24  # one batch by compressed size ...
    assert len(json.dumps(first.to_dict())) > 4 * 1024**2  # ... over the server's limit as JSON
    with httpx.Client(base_url=server_url, timeout=30) as http:
        report = TelemetryUploader(buffer, http, lambda: device.headers).drain()
    assert report.items == 24 and report.batches > 1 and buffer.drops() == {}
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count()).select_from(PredictionSample)) == 24


@pytest.mark.usefixtures("live_server", "release", "make_device", "session_factory")
def test_a_batch_the_server_keeps_failing_on_is_dropped_after_three_strikes_and_the_rest_arrives(
    request, tmp_path, monkeypatch
):
    """A server bug that answers 500 to one batch's content (injected in the intake, on both databases):
    the device strikes it three times, drops and reports it, and nothing else waits behind it."""
    import fleet_server.api.device as device_api

    checked = device_api._check_typed_events

    def buggy(events):
        if any(item.get("message") == "poison" for item, _text in events):
            raise RuntimeError("a bug the intake hits on this batch only")
        checked(events)

    monkeypatch.setattr(device_api, "_check_typed_events", buggy)
    server_url, publisher = request.getfixturevalue("live_server"), request.getfixturevalue("release")
    enroll, sessions = request.getfixturevalue("make_device"), request.getfixturevalue("session_factory")
    publisher.publish("tiny", 1)
    device = enroll()
    buffer = simulate(publisher.work_dir / "tiny-1", tmp_path, uniform(300, 9), NOW - dt.timedelta(minutes=10))
    windows = buffer.count_by_label()["window:window"]
    buffer.put("event", "error", make_event("error", error="ValueError", message="poison"))  # priority 0: first
    clock = [0.0]
    with httpx.Client(base_url=server_url, timeout=10) as http:
        uploader = TelemetryUploader(buffer, http, lambda: device.headers, batch_max_items=1, clock=lambda: clock[0])
        reports = []
        for round_ in range(MAX_STRIKES + 1):
            reports.append(uploader.maybe_drain())
            buffer.put("event", "error", make_event("error", error="ValueError", message=f"round {round_}"))
            clock[0] += 60.0
        uploader.maybe_drain()

    assert all(r is not None for r in reports) and [r.server_errors for r in reports] == [0, 0, 1, 0]
    assert buffer.stats()["items"] == 0 and uploader.failures == 0
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count()).select_from(MetricWindow)) == windows
        events = session.scalars(select(DeviceEvent).where(DeviceEvent.device_id == device.device_id)).all()
    messages = sorted(e.payload.get("message") for e in events if e.type == "error")
    assert messages == [f"round {i}" for i in range(MAX_STRIKES + 1)]
    assert [e.payload["dropped"] for e in events if e.type == "drops"] == [{"event:server_error": 1}]

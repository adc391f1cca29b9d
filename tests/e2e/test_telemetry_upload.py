"""A device's telemetry over real HTTP: an answer lost in transit, a retried batch counted once.

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
from device_agent.telemetry.sampling import Candidate, sample_record
from device_agent.telemetry.uploader import TelemetryUploader
from fleet_server.db import session_scope
from fleet_server.models import MetricWindow, PredictionSample, TelemetryBatch
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

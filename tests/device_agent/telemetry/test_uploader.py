"""Uploader decisions on each kind of answer (the real server path is tests/e2e/test_telemetry_upload.py).

A mock transport stands in for the server here only to produce the answers a real one rarely gives
on demand (401, 413, 503 in a row).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
import pytest

from bundles.errors import AuthError, ServerError
from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.events import install_event
from device_agent.telemetry.uploader import TelemetryUploader


class Server:
    def __init__(self, statuses: list[int], headers: dict[str, str] | None = None) -> None:
        self.statuses = statuses
        self.headers = headers or {}
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["content-encoding"] == "gzip"
        self.bodies.append(json.loads(gzip.decompress(request.content)))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            return httpx.Response(200, json={"accepted": {}, "duplicate": False})
        return httpx.Response(status, json={"detail": "x"}, headers=self.headers)


def uploader(tmp_path: Path, server: Server, clock: list[float]) -> TelemetryUploader:
    buffer = TelemetryBuffer(tmp_path / "t.db", 1_000_000)
    buffer.put("event", "install", install_event("m", 2, "installed"))
    http = httpx.Client(base_url="http://fleet.test", transport=httpx.MockTransport(server))
    return TelemetryUploader(buffer, http, lambda: {"Authorization": "Bearer t"}, clock=lambda: clock[0])


def test_server_errors_back_off_exponentially_and_resend_the_same_batch(tmp_path: Path) -> None:
    clock = [0.0]
    server = Server([503, 503, 503])
    up = uploader(tmp_path, server, clock)
    waits = []
    for _ in range(3):
        assert up.maybe_drain() is None
        waits.append(up.next_attempt_at - clock[0])
        clock[0] = up.next_attempt_at
    assert 2.5 <= waits[0] <= 5.0 and 5.0 <= waits[1] <= 10.0 and 10.0 <= waits[2] <= 20.0
    report = up.maybe_drain()
    assert report is not None and report.items == 1 and up.failures == 0
    assert len({body["batch_id"] for body in server.bodies}) == 1  # four sends, one batch id


@pytest.mark.parametrize(("retry_after", "low", "high"), [("30", 30.0, 30.0), ("100000", 600.0, 600.0)])
def test_a_503_with_retry_after_is_not_retried_sooner_and_never_later_than_the_cap(
    tmp_path: Path, retry_after: str, low: float, high: float
) -> None:
    clock = [0.0]
    up = uploader(tmp_path, Server([503], {"Retry-After": retry_after}), clock)
    assert up.maybe_drain() is None
    assert low <= up.next_attempt_at - clock[0] <= high  # the backoff alone would be 2.5 to 5 s


def test_a_503_with_retry_after_is_an_outage_no_batch_is_sent_after_it(tmp_path: Path) -> None:
    clock = [0.0]
    server = Server([503], {"Retry-After": "30"})
    up = uploader(tmp_path, server, clock)
    up.buffer.put("event", "install", install_event("m", 3, "installed"))
    up.batch_max_items = 1  # two batches: a probe would be sent at once without Retry-After
    assert up.maybe_drain() is None
    assert len(server.bodies) == 1 and up.next_attempt_at - clock[0] >= 30.0


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422])
def test_a_refused_batch_is_dropped_counted_and_draining_goes_on(tmp_path: Path, status: int) -> None:
    server = Server([status])
    up = uploader(tmp_path, server, [0.0])
    report = up.maybe_drain()
    assert report is not None and report.rejected == 1 and up.failures == 0 and up.rejected_batches == 1
    assert up.buffer.stats()["items"] == 0
    assert len(server.bodies) == 2  # the refused batch, then at once the next one: its drops report
    drops = next(e for e in server.bodies[1]["events"] if e["type"] == "drops")
    assert drops["dropped"] == {"event:rejected": 1}


def test_revoked_credentials_keep_the_batch(tmp_path: Path) -> None:
    up = uploader(tmp_path, Server([401]), [0.0])
    with pytest.raises(AuthError):
        up.drain()
    assert up.buffer.stats()["items"] == 1


@pytest.mark.parametrize("status", [408, 429])
def test_a_4xx_that_means_later_keeps_the_batch(tmp_path: Path, status: int) -> None:
    up = uploader(tmp_path, Server([status]), [0.0])
    assert up.maybe_drain() is None and up.failures == 1
    assert up.buffer.stats()["items"] == 1


def test_a_5xx_is_a_server_error(tmp_path: Path) -> None:
    up = uploader(tmp_path, Server([500]), [0.0])
    with pytest.raises(ServerError):
        up.drain()


def test_a_batch_over_the_body_limit_is_halved_before_its_first_send_and_loses_nothing(tmp_path: Path) -> None:
    server = Server([])
    buffer = TelemetryBuffer(tmp_path / "t.db", 10_000_000)
    for i in range(40):  # compressible: 40 items in one compressed batch, ~4 times the body limit as JSON
        buffer.put("event", "note", {"type": "note", "n": i, "pad": "0" * 2_000})
    http = httpx.Client(base_url="http://fleet.test", transport=httpx.MockTransport(server))
    up = TelemetryUploader(buffer, http, lambda: {}, max_body_bytes=20_000)
    report = up.drain()
    assert report.items == 40 and buffer.stats()["items"] == 0 and buffer.drops() == {}
    sizes = [len(json.dumps(body, separators=(",", ":"))) for body in server.bodies]
    assert len(sizes) > 1 and max(sizes) <= 20_000
    assert sorted(e["n"] for body in server.bodies for e in body["events"]) == list(range(40))


def test_a_single_item_over_the_body_limit_is_dropped_and_reported(tmp_path: Path) -> None:
    server = Server([])
    buffer = TelemetryBuffer(tmp_path / "t.db", 10_000_000)
    buffer.put("event", "note", {"type": "note", "pad": "0" * 50_000})
    buffer.put("event", "install", install_event("m", 2, "installed"))
    http = httpx.Client(base_url="http://fleet.test", transport=httpx.MockTransport(server))
    up = TelemetryUploader(buffer, http, lambda: {}, max_body_bytes=20_000)
    up.drain()
    events = [e for body in server.bodies for e in body["events"]]
    assert [e["type"] for e in events] == ["install", "drops"]
    assert events[1]["dropped"] == {"event:too_large": 1}

"""A batch the server keeps failing on (5xx) is dropped after a few strikes; an outage drops nothing.

The uploader talks over real HTTP to a small telemetry server on loopback (``BuggyServer``): it stores
batches once per batch id as the fleet server does, and answers 500 to any batch holding an item
marked ``poison`` (a server bug that fails on one batch's content), or 503 to everything while
``down``. The fleet server itself is hardened to answer 4xx to bad input, so it cannot be made to
show such a bug on demand; ``tests/e2e/test_telemetry_upload.py`` covers the real server's paths.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import sqlite3
import threading
from collections.abc import Collection, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.uploader import MAX_STRIKES, TelemetryUploader

BATCH_ITEMS = 5


class BuggyServer:
    """A telemetry endpoint on 127.0.0.1: 500 to batches with a ``poison`` item (``flaky``: only the first
    ``flaky`` times), 503 to every batch while ``down``, else 200 (``duplicate`` for a batch id seen)."""

    def __init__(self) -> None:
        self.down = False
        self.flaky: int | None = None
        self.stored: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(gzip.decompress(self.rfile.read(int(self.headers["Content-Length"]))))
                status = server.answer(body)
                payload = json.dumps({"duplicate": False} if status == 200 else {"detail": "boom"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def answer(self, body: dict[str, Any]) -> int:
        with self._lock:
            status = self._status(body)
            self.requests.append((body["batch_id"], status))
            if status == 200:
                self.stored.setdefault(body["batch_id"], body["events"])
            return status

    def _status(self, body: dict[str, Any]) -> int:
        if self.down:
            return 503
        if any(event.get("poison") for event in body["events"]):
            if self.flaky is None:
                return 500
            if self.flaky > 0:
                self.flaky -= 1
                return 500
        return 200

    def notes(self) -> list[int]:
        """The ``n`` of every stored note, in order."""
        return sorted(e["n"] for events in self.stored.values() for e in events if e["type"] == "note")

    def drops(self) -> dict[str, int]:
        """Every drop the device reported, summed."""
        total: dict[str, int] = {}
        for events in self.stored.values():
            for event in events:
                for label, n in event.get("dropped", {}).items() if event["type"] == "drops" else ():
                    total[label] = total.get(label, 0) + n
        return total

    def __enter__(self) -> BuggyServer:
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def server() -> Iterator[BuggyServer]:
    with BuggyServer() as running:
        yield running


class Device:
    """A buffer on disk, an uploader on a fake clock, and the notes it queues (one batch per 5 notes)."""

    def __init__(self, path: Path, url: str) -> None:
        self.path, self.url = path, url
        self.clock = [0.0]
        self.queued = 0
        self.http = httpx.Client(base_url=url, timeout=10)
        self.buffer = TelemetryBuffer(path, 1_000_000)
        self.uploader = self._uploader()

    def _uploader(self) -> TelemetryUploader:
        return TelemetryUploader(self.buffer, self.http, clock=lambda: self.clock[0], batch_max_items=BATCH_ITEMS)

    def queue(self, count: int, poison_at: Collection[int] = ()) -> None:
        for _ in range(count):
            note: dict[str, Any] = {"type": "note", "n": self.queued}
            if self.queued in poison_at:
                note["poison"] = True
            self.buffer.put("event", "note", note)
            self.queued += 1

    def tick(self) -> Any:
        """The next upload round, when the backoff allows it (a minute later otherwise)."""
        self.clock[0] = max(self.clock[0] + 60.0, self.uploader.next_attempt_at)
        return self.uploader.maybe_drain()

    def restart(self) -> None:
        self.buffer.close()
        self.buffer = TelemetryBuffer(self.path, 1_000_000)
        self.uploader = self._uploader()

    def strikes(self) -> dict[str, int]:
        """Strikes stored in the file, by batch id."""
        with sqlite3.connect(self.path) as db:
            rows = db.execute("SELECT batch_id, MAX(strikes) FROM items WHERE batch_id IS NOT NULL GROUP BY batch_id")
            return {batch_id: int(n) for batch_id, n in rows.fetchall()}

    def close(self) -> None:
        self.http.close()
        self.buffer.close()


@pytest.fixture
def device(tmp_path: Path, server: BuggyServer) -> Iterator[Device]:
    made = Device(tmp_path / "telemetry.db", server.url)
    yield made
    made.close()


def test_a_poison_batch_is_dropped_after_three_strikes_counted_reported_and_everything_else_is_delivered(
    device: Device, server: BuggyServer, caplog: pytest.LogCaptureFixture
) -> None:
    device.queue(20, poison_at=(2,))  # the first batch (notes 0-4) holds the poison note
    caplog.set_level(logging.WARNING, "device_agent.telemetry.uploader")
    reports = []
    for _ in range(MAX_STRIKES):
        reports.append(device.tick())
        device.queue(BATCH_ITEMS)  # a live device queues new windows between rounds
    poison = server.requests[0][0]
    assert [r.strikes for r in reports] == [1, 1, 1] and [r.server_errors for r in reports] == [0, 0, 1]
    assert all(r is not None for r in reports) and device.uploader.failures == 0  # never backed off
    assert [status for batch_id, status in server.requests if batch_id == poison] == [500] * MAX_STRIKES

    device.tick()
    assert server.notes() == [n for n in range(device.queued) if n not in range(BATCH_ITEMS)]
    assert server.drops() == {"event:server_error": BATCH_ITEMS}  # reported like the other drops
    assert device.buffer.stats()["items"] == 0 and device.buffer.drops() == {}
    assert f"telemetry batch {poison} dropped: the server answered 500" in caplog.text


def test_the_batches_behind_a_poison_batch_go_in_the_same_round(device: Device, server: BuggyServer) -> None:
    device.queue(20, poison_at=(2,))
    report = device.tick()
    assert report is not None and report.items == 15 and report.strikes == 1
    assert server.notes() == list(range(5, 20))  # head-of-line blocking is gone from the first round


def test_two_poison_batches_in_a_row_are_both_struck_not_taken_for_an_outage(
    device: Device, server: BuggyServer
) -> None:
    device.queue(20, poison_at=(2, 7))  # the first two batches (notes 0-4 and 5-9)
    for _ in range(MAX_STRIKES):
        device.tick()
        device.queue(BATCH_ITEMS)
    device.tick()
    assert server.notes() == [n for n in range(device.queued) if n >= 2 * BATCH_ITEMS]
    assert server.drops() == {"event:server_error": 2 * BATCH_ITEMS}


def _refused_url() -> str:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("outage", ["every batch answered 503", "connection refused"])
def test_an_outage_drops_nothing_strikes_nothing_and_the_backoff_grows(
    device: Device, server: BuggyServer, outage: str
) -> None:
    device.queue(20)
    if outage == "connection refused":
        device.uploader.client = httpx.Client(base_url=_refused_url(), timeout=10)
    server.down = True
    waits = []
    for _ in range(6):
        assert device.tick() is None
        waits.append(device.uploader.next_attempt_at - device.clock[0])
        device.queue(BATCH_ITEMS)
    ceilings = [5.0 * 2**i for i in range(6)]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True)), waits
    assert device.buffer.drops() == {} and device.buffer.stats()["items"] == 20 + 6 * BATCH_ITEMS
    assert set(device.strikes().values()) <= {0}
    assert len(device.strikes()) <= 3  # the head and at most two probes in flight, whatever the length
    assert len(server.requests) <= 3 * 6  # a head and two probes per round at most

    server.down = False
    device.uploader.client = device.http
    device.tick()
    assert server.notes() == list(range(device.queued)) and server.drops() == {}
    assert device.buffer.stats()["items"] == 0


def test_strikes_survive_a_restart_of_the_uploader_over_the_same_buffer(device: Device, server: BuggyServer) -> None:
    device.queue(10, poison_at=(0,))
    device.tick()
    assert sorted(device.strikes().values()) == [1]
    device.restart()  # e.g. the agent restarted: the strike is in telemetry.db
    assert sorted(device.strikes().values()) == [1]
    device.queue(BATCH_ITEMS)
    device.tick()
    assert sorted(device.strikes().values()) == [2]
    device.queue(BATCH_ITEMS)
    report = device.tick()
    assert report is not None and report.server_errors == 1 and device.strikes() == {}
    assert len({batch_id for batch_id, status in server.requests if status == 500}) == 1  # the same batch id


def test_a_batch_that_failed_once_and_then_succeeds_is_delivered_not_dropped(
    device: Device, server: BuggyServer
) -> None:
    server.flaky = 1  # the poison note's batch fails once only: a transient server error
    device.queue(10, poison_at=(2,))
    first = device.tick()
    assert first is not None and first.strikes == 1 and first.server_errors == 0
    device.tick()
    assert server.notes() == list(range(10)) and server.drops() == {}
    assert device.buffer.stats()["items"] == 0
    batch_ids = [batch_id for batch_id, _status in server.requests]
    assert batch_ids.count(server.requests[0][0]) == 2  # sent again with the same id

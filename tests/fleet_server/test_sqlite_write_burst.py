"""A burst of enrollments on a SQLite server (``edgefleet-server run``, one and two workers) loses nothing.

The fleet simulator found a one-process SQLite server collapsing under about 100 enrollments a
second (``docs/simulator.md``): writers waited past the busy timeout and failed. Here the server runs
as a user runs it, background tasks on, and devices behave as the agent does: a burst of
``BURST`` new devices, each starting its enrollment (challenge, then enroll) at ``RATE_PER_S``,
while devices enrolled before the burst keep uploading telemetry and polling their desired state.
A 503 is allowed only as the documented answer (``Retry-After`` and the ``{"detail": ...}`` body),
which the device obeys before trying again; any other 5xx or a request that times out fails the
test. Afterwards every device of the burst exists in the database with the token it was given, and
every telemetry batch the server acknowledged is stored once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from fleet_server.db import make_engine, make_session_factory, session_scope, upgrade_database
from fleet_server.services.enroll_tokens import create_enroll_token
from tests.fleet_server.conftest import TEST_PEPPER, auth, default_inventory, enroll_device
from tests.fleet_server.server_process import ServerProcess

BURST = 200
RATE_PER_S = 200.0
STEADY_DEVICES = 8
MAX_ATTEMPTS = 6  # a device that is told to retry later tries again, as the agent does
REQUEST_TIMEOUT_S = 30.0
AT = "2026-11-29T12:00:00+00:00"


@dataclass
class Ledger:
    """Every answer the server gave during the burst, by what was asked."""

    answers: list[tuple[str, int, str | None, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str, response: httpx.Response) -> None:
        with self.lock:
            self.answers.append((what, response.status_code, response.headers.get("retry-after"), response.text))

    def fail(self, what: str, error: BaseException) -> None:
        with self.lock:
            self.failures.append(f"{what}: {type(error).__name__}: {error}")

    def dropped(self, what: str, error: BaseException) -> None:
        with self.lock:
            self.drops.append(f"{what}: {type(error).__name__}: {error}")

    def unexplained(self) -> list[tuple[str, int, str | None, str]]:
        """5xx answers other than the documented 503 (``Retry-After`` and a ``detail`` body)."""
        return [a for a in self.answers if a[1] >= 500 and not _documented_503(a)]

    def count(self, status: int) -> int:
        return sum(1 for a in self.answers if a[1] == status)


def _documented_503(answer: tuple[str, int, str | None, str]) -> bool:
    _, status, retry_after, text = answer
    return status == 503 and retry_after is not None and retry_after.isdigit() and '"detail"' in text


def _retry_after_s(response: httpx.Response) -> float | None:
    """Seconds to wait when the server says "later" (the documented 503), else None."""
    if response.status_code == 503 and (response.headers.get("retry-after") or "").isdigit():
        return float(response.headers["retry-after"])
    return None


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ServerProcess, sa.Engine, str]]:
    database_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade_database(database_url)
    engine = make_engine(database_url)
    with session_scope(make_session_factory(engine)) as session:
        _, token = create_enroll_token(session, fleet="lab", expires_in_s=3600, max_uses=None, actor="test",
                                       pepper=TEST_PEPPER)  # fmt: skip
    env = {"EDGEFLEET_ENROLL_RATE_PER_MINUTE": "100000"}  # the burst comes from one address
    with ServerProcess(database_url, tmp_path / "data", workers=request.param, **env) as process:
        yield process, engine, token
    engine.dispose()


def enroll_like_an_agent(http: httpx.Client, token: str, ledger: Ledger) -> dict[str, Any] | None:
    """Challenge and enroll, waiting ``Retry-After`` whenever the server says so (and a second after a
    dropped connection, which the agent retries too); the enrollment, or None if it never came."""
    for _ in range(MAX_ATTEMPTS):
        try:
            response = enroll_device(_Recording(http, ledger), token, default_inventory())
        except httpx.TimeoutException as e:  # no answer within REQUEST_TIMEOUT_S: what the collapse looked like
            ledger.fail("enroll", e)
            return None
        except httpx.TransportError as e:  # e.g. a keep-alive connection the server closed as it was reused
            ledger.dropped("enroll", e)
            time.sleep(1.0)
            continue
        wait_s = _retry_after_s(response)
        if wait_s is None:
            return dict(response.json()) if response.status_code == 200 else None
        time.sleep(wait_s)
    return None


class _Recording:
    """An httpx client that notes every answer in the ledger (the challenge's too) and retries a 503'd
    challenge after its ``Retry-After`` (``enroll_device`` reads the nonce from the first answer)."""

    def __init__(self, http: httpx.Client, ledger: Ledger) -> None:
        self.http, self.ledger = http, ledger

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        for _ in range(MAX_ATTEMPTS):
            response = self.http.post(path, **kwargs)
            self.ledger.note(path, response)
            wait_s = _retry_after_s(response)
            if wait_s is None or not path.endswith("/challenge"):
                return response
            time.sleep(wait_s)
        return response


def steady_device(url: str, access_token: str, ledger: Ledger, stop: threading.Event, acknowledged: set[str]) -> None:
    """Upload a telemetry batch and poll, again and again, until the burst is over."""
    headers, etag = auth(access_token), None
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        while not stop.is_set():
            batch_id = uuid.uuid4().hex
            body = {"batch_id": batch_id, "events": [{"id": uuid.uuid4().hex, "type": "error", "at": AT}]}
            try:
                uploaded = http.post("/api/v1/device/telemetry", json=body, headers=headers)
                ledger.note("telemetry", uploaded)
                if uploaded.status_code == 200:
                    acknowledged.add(batch_id)
                polled = http.get("/api/v1/device/desired-state",
                                  headers={**headers, **({"If-None-Match": etag} if etag else {})})  # fmt: skip
                ledger.note("poll", polled)
                etag = polled.headers.get("etag", etag)
            except httpx.TimeoutException as e:
                ledger.fail("steady device", e)
                return
            except httpx.TransportError as e:
                ledger.dropped("steady device", e)
            time.sleep(0.02)


def at_rate(count: int, rate_per_s: float, action: Callable[[int], Any]) -> list[Any]:
    """Start ``action(i)`` for i in range(count) at ``rate_per_s`` (each in its own thread); the results."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        started = time.monotonic()
        futures = []
        for i in range(count):
            time.sleep(max(0.0, started + i / rate_per_s - time.monotonic()))
            futures.append(pool.submit(action, i))
        return [future.result() for future in futures]


def test_a_burst_of_enrollments_with_telemetry_and_polls_gets_no_5xx_but_documented_503s_and_loses_nothing(
    server: tuple[ServerProcess, sa.Engine, str],
) -> None:
    process, engine, token = server
    ledger, stop, acknowledged = Ledger(), threading.Event(), set[str]()
    devices = [httpx.Client(base_url=process.url, timeout=REQUEST_TIMEOUT_S) for _ in range(BURST)]  # one each
    with httpx.Client(base_url=process.url, timeout=REQUEST_TIMEOUT_S) as http:
        steady = [enroll_device(http, token, default_inventory()).json()["access_token"] for _ in range(STEADY_DEVICES)]
        threads = [threading.Thread(target=steady_device, args=(process.url, t, ledger, stop, acknowledged))
                   for t in steady]  # fmt: skip
        for thread in threads:
            thread.start()
        try:
            enrolled = at_rate(BURST, RATE_PER_S, lambda i: enroll_like_an_agent(devices[i], token, ledger))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            for client in devices:
                client.close()
        assert ledger.failures == [], ledger.failures[:5]
        assert ledger.unexplained() == [], ledger.unexplained()[:5]
        assert [e for e in enrolled if e is None] == []
        polls = [http.get("/api/v1/device/desired-state", headers=auth(e["access_token"])) for e in enrolled]
    assert {p.status_code for p in polls} == {200}  # each device exists and its token is the one it was given
    with engine.connect() as connection:
        devices = set(connection.scalars(sa.text("SELECT id FROM devices")))
        batches = list(connection.scalars(sa.text("SELECT batch_id FROM telemetry_batches")))
    assert {e["device_id"] for e in enrolled} <= devices
    assert len(devices) == BURST + STEADY_DEVICES
    assert acknowledged <= set(batches) and len(batches) == len(set(batches))
    assert ledger.count(200) > BURST  # the steady devices were served during the burst too
    print(f"answers {len(ledger.answers)}, 503s {ledger.count(503)}, dropped connections {len(ledger.drops)},"
          f" telemetry batches {len(batches)}")  # fmt: skip

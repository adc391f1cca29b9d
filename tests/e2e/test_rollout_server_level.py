"""End to end at the server level: a real fleet server on loopback (uvicorn, PostgreSQL, the rollout
loop started with the app) and simulated devices that speak the real device HTTP API: they enroll,
report inventory, poll desired state (honouring start-after), "install" what it names, and post real
telemetry batches (install events, metric windows in the docs/telemetry.md shape) through intake.

A good bundle goes through every wave; a bad one (errors, slow, drifting) stops at the first wave and
is rolled back by the engine, with the decision naming the breached gate and its figures, and the
canaries' desired state pointing back at the previous bundle; a silent canary times out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_server.db import make_session_factory, session_scope
from fleet_server.settings import Settings
from tests.fleet_server import conftest as server_fixtures
from tests.fleet_server.conftest import TEST_PEPPER, auth, default_inventory, enroll_device
from tests.fleet_server.rollouts.fleetsim import publish, window_payload

# The fleet server's fixtures, used by name (this directory has no conftest of its own).
database_url, db_engine, app = server_fixtures.database_url, server_fixtures.db_engine, server_fixtures.app
live_server, make_api_key = server_fixtures.live_server, server_fixtures.make_api_key
make_enroll_token, session_factory = server_fixtures.make_enroll_token, server_fixtures.session_factory

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)]
ROLLOUTS = "/api/v1/admin/rollouts"
STEP_S = 0.15


@pytest.fixture
def settings(db_engine, database_url, tmp_path: Path, monkeypatch) -> Settings:
    """Production settings with background tasks on, so the rollout loop runs (every 0.2 s)."""
    monkeypatch.setenv("EDGEFLEET_ROLLOUT_TICK_S", "0.2")
    return Settings(mode="production", data_dir=tmp_path / "data", database_url=database_url,
                    public_url="https://fleet.test", token_pepper=TEST_PEPPER, background_tasks=True,
                    json_logs=False, log_level="warning")  # fmt: skip


class SimDevice:
    """A device driven through the real HTTP API; ``behaviour`` says how the new bundle behaves."""

    def __init__(self, base_url: str, token: str, manifests: dict[int, Any], behaviour: str = "good") -> None:
        self.http = httpx.Client(base_url=base_url, timeout=10)
        response = enroll_device(self.http, token, default_inventory())
        assert response.status_code == 200, response.text
        self.device_id = response.json()["device_id"]
        self.headers = auth(response.json()["access_token"])
        self.manifests, self.behaviour = manifests, behaviour
        self.running: int | None = None
        self.seen_versions: list[int] = []
        self.last_report = dt.datetime.now(dt.timezone.utc)

    def desired(self) -> dict[str, Any] | None:
        response = self.http.get("/api/v1/device/desired-state", headers=self.headers)
        assert response.status_code == 200, response.text
        return next((m for m in response.json()["models"] if m["name"] == "digits"), None)

    def step(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        entry = self.desired()
        events: list[dict[str, Any]] = []
        if entry is not None and entry["version"] != self.running and _due(entry, now):
            events.append(self._install(entry, now))
        if self.running is not None and not (self.behaviour == "silent" and self.running == 2):
            self._post(events, [self._window(now)])
        elif events:
            self._post(events, [])
        self.last_report = now

    def _install(self, entry: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
        previous, self.running = self.running, entry["version"]
        self.seen_versions.append(entry["version"])
        inventory = {
            **default_inventory(),
            "installed": [
                {"name": "digits", "version": self.running, "variant": "onnx-fp32", "slot": "a", "state": "active"}
            ],
        }
        self.http.put("/api/v1/device/inventory", json=inventory, headers=self.headers).raise_for_status()
        return {"id": uuid.uuid4().hex, "type": "install", "at": now.isoformat(), "model": "digits",
                "version": self.running, "deployment_id": entry["rollout_id"], "from_version": previous,
                "to_version": self.running, "result": "installed", "reason": None, "state_path": []}  # fmt: skip

    def _window(self, now: dt.datetime) -> dict[str, Any]:
        bad = self.running == 2
        knobs = {"errors": {"errors": 6}, "slow": {"latency_ms": 90.0}, "drift": {"drift": True}}
        extra = knobs.get(self.behaviour, {}) if bad else {}
        payload = window_payload(self.manifests[self.running], requests=60, **extra)
        return {"id": uuid.uuid4().hex, "model": "digits", "version": self.running,
                "start": self.last_report.isoformat(), "end": now.isoformat(), **payload}  # fmt: skip

    def _post(self, events: list[dict[str, Any]], windows: list[dict[str, Any]]) -> None:
        batch = {"batch_id": uuid.uuid4().hex, "events": events, "windows": windows, "samples": []}
        response = self.http.post("/api/v1/device/telemetry", json=batch, headers=self.headers)
        assert response.status_code == 200, response.text


def _due(entry: dict[str, Any], now: dt.datetime) -> bool:
    start_after = entry.get("start_after")
    return start_after is None or dt.datetime.fromisoformat(start_after) <= now


def fleet_on(url: str, app, make_api_key, make_enroll_token, tmp_path):
    """Publish digits@1 and @2; a builder of devices on v1 talking to ``url``, and an operator client."""
    factory = make_session_factory(app.state.engine)
    manifests: dict[int, Any] = {}
    with session_scope(factory) as session:
        for version in (1, 2):
            manifests[version] = publish(session, tmp_path, "digits", version)
    admin = httpx.Client(base_url=url, headers=auth(make_api_key("operator")), timeout=10)

    def make(behaviours: list[str]) -> list[SimDevice]:
        token = make_enroll_token("e2e")
        devices = [SimDevice(url, token, manifests, b) for b in behaviours]
        for device in devices:
            body = {"device_id": device.device_id, "model_name": "digits", "bundle_version": 1, "pinned": False}
            admin.put("/api/v1/admin/assignments", json=body).raise_for_status()
            device.step()
        return devices

    return make, admin


@pytest.fixture
def fleet(live_server, app, make_api_key, make_enroll_token, tmp_path):
    make, admin = fleet_on(live_server, app, make_api_key, make_enroll_token, tmp_path)
    yield make, admin
    admin.close()


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """``app`` under uvicorn on 127.0.0.1 until the block ends (its lifespan, so its rollout loop, too)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def run_until_settled(admin: httpx.Client, rollout_id: int, devices: list[SimDevice], timeout_s: float = 40.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for device in devices:
            device.step()
        view = admin.get(f"{ROLLOUTS}/{rollout_id}").json()
        if view["state"] not in ("running", "draft"):
            for device in devices:
                device.step()  # let devices see their final desired state
            return view
        time.sleep(STEP_S)
    raise AssertionError(f"rollout {rollout_id} still {view['state']} after {timeout_s} s: {view['waves']}")


def create(admin: httpx.Client, gates: list[str], waves: str = "25%,50%,100%", device_timeout: str = "20s") -> int:
    """A rollout of digits@2; the device timeout is generous (a step of eight devices takes seconds on a
    loaded CI host) except where a test wants a silent device timed out."""
    body = {"bundle": "digits@2", "targets": ["where:fleet=e2e"], "waves": waves, "gates": gates,
            "soak": "1s", "device_timeout": device_timeout, "jitter": "0s"}  # fmt: skip
    response = admin.post(ROLLOUTS, json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


GATES = ["error_rate<0.01 min=50", "p99_ms<40 min=50", "psi<0.2 min=50"]


def test_good_bundle_rolls_out_through_every_wave(fleet):
    make, admin = fleet
    devices = make(["good"] * 8)
    rollout_id = create(admin, GATES)
    view = run_until_settled(admin, rollout_id, devices)
    assert view["state"] == "completed", view["decisions"]
    assert [d["action"] for d in view["decisions"]] == ["create", "start", "advance", "advance", "complete"]
    assert [(w["devices"], w["outcomes"]) for w in view["waves"]] == [
        (2, {"healthy": 2}),
        (2, {"healthy": 2}),
        (4, {"healthy": 4}),
    ]
    assert all(d.running == 2 and d.desired()["rollout_id"] == rollout_id for d in devices)
    first_wave_gates = {g["gate"]: g for g in view["decisions"][2]["record"]["gates"]}
    assert first_wave_gates["p99_ms<40 min=50"]["status"] == "pass"
    assert first_wave_gates["error_rate<0.01 min=50"]["control_value"] == 0.0  # the devices still on v1


@pytest.mark.parametrize(
    ("behaviour", "gate", "figure"),
    [
        ("errors", "error_rate<0.01 min=50", "error_rate=0.1 breached <0.01"),
        ("slow", "p99_ms<40 min=50", "p99_ms="),
        ("drift", "psi<0.2 min=50", "psi="),
    ],
)
def test_bad_bundle_stops_at_the_first_wave_and_is_rolled_back(fleet, behaviour, gate, figure):
    make, admin = fleet
    devices = make([behaviour] * 8)
    rollout_id = create(admin, GATES)
    view = run_until_settled(admin, rollout_id, devices)
    assert view["state"] == "rolled_back", view["decisions"]
    rollback = view["decisions"][-1]
    assert (rollback["action"], rollback["actor"], rollback["wave"]) == ("rollback", "engine", 1)
    assert figure in rollback["reason"]
    breached = [g for g in rollback["record"]["gates"] if g["status"] == "fail"]
    assert gate in [g["gate"] for g in breached] and all(g["sample"] >= 50 for g in breached)
    assert [w["state"] for w in view["waves"]] == ["failed", "cancelled", "cancelled"]
    detail = admin.get(f"{ROLLOUTS}/{rollout_id}?devices=true").json()["device_detail"]
    released = {d["device_id"] for d in detail if d["released_at"]}
    canaries = [d for d in devices if d.device_id in released]
    assert len(canaries) == 2 and any(2 in d.seen_versions for d in canaries)
    for device in canaries:  # a canary may be rolled back before it even polled: the halt is that fast
        entry = device.desired()
        assert (entry["version"], entry["rollout_id"], entry["shadow"]) == (1, None, None)
        assert device.running == 1  # it followed the rollback
    assert all(d.seen_versions == [1] for d in devices if d not in canaries)


def test_silent_canaries_time_out_and_the_rollout_is_rolled_back(fleet):
    make, admin = fleet
    devices = make(["silent"] * 4)
    rollout_id = create(admin, ["error_rate<0.01 min=50"], device_timeout="2s")
    view = run_until_settled(admin, rollout_id, devices)
    assert view["state"] == "rolled_back"
    assert view["waves"][0]["outcomes"] == {"timed_out": 1}
    assert "install_success cannot reach >=0.95" in view["decisions"][-1]["reason"]
    assert "1 timed out" in view["decisions"][-1]["reason"]


def test_server_restart_mid_rollout_resumes_where_it_was(settings, app, make_api_key, make_enroll_token, tmp_path):
    """Stop the server (and its rollout loop) with wave 2 mid-soak; a new server on the database finishes."""
    from fleet_server.app import create_app

    with serve(app) as first_url:
        make, admin = fleet_on(first_url, app, make_api_key, make_enroll_token, tmp_path)
        devices = make(["good"] * 8)
        rollout_id = create(admin, ["error_rate<0.01 min=50"])
        deadline = time.monotonic() + 30
        while admin.get(f"{ROLLOUTS}/{rollout_id}").json()["current_wave"] < 1 and time.monotonic() < deadline:
            for device in devices:
                device.step()
            time.sleep(STEP_S)
        before = admin.get(f"{ROLLOUTS}/{rollout_id}?devices=true").json()
    assert before["state"] == "running" and before["current_wave"] == 1, before["decisions"]
    assert before["waves"][1]["state"] in ("running", "soaking")

    with serve(create_app(settings)) as second_url:  # a new process: new engine, sessions and rollout loop
        for device in devices:
            device.http = httpx.Client(base_url=second_url, timeout=10)
        admin.base_url = httpx.URL(second_url)
        after = admin.get(f"{ROLLOUTS}/{rollout_id}?devices=true").json()
        assert [d["start_after"] for d in after["device_detail"]] == [d["start_after"] for d in before["device_detail"]]
        assert after["current_wave"] == 1 and after["waves"][1]["state"] in ("running", "soaking")
        view = run_until_settled(admin, rollout_id, devices)
    assert view["state"] == "completed"
    assert [d["action"] for d in view["decisions"]] == ["create", "start", "advance", "advance", "complete"]
    assert all(d.running == 2 for d in devices)

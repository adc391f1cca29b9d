"""A small fleet arranged through the real device and admin APIs, for the dashboard tests.

``build_fleet(http, ...)`` works with any client of the app (a ``TestClient`` or an ``httpx.Client`` on
the live server): devices enroll with real Ed25519 keys and report inventory, install events,
heartbeats, metric windows (the ``docs/telemetry.md`` shape, on the bundle's baseline bins) and
sampled predictions through ``POST /api/v1/device/telemetry``; a rollout is created through the admin
API. One device is hostile: every free-text field it controls carries markup meant to run script.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from fleet_server.db import session_scope
from tests.fleet_server.conftest import auth, default_inventory, enroll_device
from tests.fleet_server.rollouts.fleetsim import publish, window_payload

ROLLOUTS = "/api/v1/admin/rollouts"
# Each fits the field it goes into (agent_version <= 32 chars, hw_class <= 64, names <= 100).
XSS_SVG = "<svg onload=window.__xss=1>"
XSS_IMG = "<img src=x onerror=window.__xss=2>"
XSS_ATTR = '"><script>window.__xss=3</script>'
XSS_PAYLOADS = (XSS_SVG, XSS_IMG, XSS_ATTR)


@dataclass
class Fleet:
    """What was arranged: device ids (the hostile one separately), the manifests, a rollout."""

    devices: list[str] = field(default_factory=list)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    inventories: dict[str, dict[str, Any]] = field(default_factory=dict)
    hostile: str = ""
    manifests: dict[int, Any] = field(default_factory=dict)
    rollout_id: int = 0


def publish_digits(factory: sessionmaker[Session], tmp: Path) -> dict[int, Any]:
    """digits@1 and digits@2: real tiny ONNX bundles registered as published (``fleetsim.publish``)."""
    with session_scope(factory) as session:
        return {version: publish(session, tmp, "digits", version) for version in (1, 2)}


def running(version: int, name: str = "digits", variant: str | None = "onnx-fp32") -> dict[str, Any]:
    return {"name": name, "version": version, "variant": variant, "slot": "a", "state": "active"}


def enroll(http: Any, token: str, inventory: dict[str, Any]) -> tuple[str, dict[str, str]]:
    response = enroll_device(http, token, inventory)
    assert response.status_code == 200, response.text
    return response.json()["device_id"], auth(response.json()["access_token"])


def report(http: Any, headers: dict[str, str], events=(), windows=(), samples=()) -> None:
    batch = {"batch_id": uuid.uuid4().hex, "events": list(events), "windows": list(windows), "samples": list(samples)}
    response = http.post("/api/v1/device/telemetry", json=batch, headers=headers)
    assert response.status_code == 200, response.text


def install_event(
    version: int,
    at: dt.datetime,
    previous: int | None,
    result: str = "installed",
    reason: str | None = None,
    rollout_id: int | None = None,
) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "type": "install",
        "at": at.isoformat(),
        "model": "digits",
        "version": version,
        "deployment_id": rollout_id,
        "from_version": previous,
        "to_version": version,
        "result": result,
        "reason": reason,
        "state_path": ["download", "verify", "stage", "activate", "health-check", "commit"],
    }


def heartbeat(version: int, at: dt.datetime, health: str = "ok") -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "type": "heartbeat",
        "at": at.isoformat(),
        "model": None,
        "version": None,
        "uptime_s": 3600,
        "models": [{"name": "digits", "version": version, "state": "active"}],
        "health": health,
        "serving": ["digits"],
        "queue": {"running": 0, "waiting": 0},
        "update_in_progress": None,
        "buffer": {"items": 3, "bytes": 2048, "cap_bytes": 50_000_000},
    }


def window(manifest: Any, version: int, end: dt.datetime, requests: int = 120, **knobs: Any) -> dict[str, Any]:
    start = end - dt.timedelta(seconds=60)
    return {
        "id": uuid.uuid4().hex,
        "model": "digits",
        "version": version,
        "start": start.isoformat(),
        "end": end.isoformat(),
        **window_payload(manifest, requests=requests, **knobs),
    }


def sample(version: int, at: dt.datetime, label: str, reason: str = "rate") -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "at": at.isoformat(),
        "model": "digits",
        "version": version,
        "source": "local",
        "capture_reason": reason,
        "inclusion_probability": 0.01,
        "inputs": {"x": {"dtype": "float32", "shape": [1, 4], "data": [0.5, -1.0, 0.25, 1.5]}},
        "outputs": {"label": {"dtype": "string", "shape": [1], "data": [label]}},
        "redacted": [],
        "latency_ms": 1.9,
        "fallback_reason": None,
        "error": None,
        "confidence": 0.93,
    }


def build_fleet(
    http: Any,
    token: str,
    operator: dict[str, str],
    manifests: dict[int, Any],
    devices: int = 4,
    rollout: dict[str, Any] | None = None,
) -> Fleet:
    """``devices`` ordinary devices on digits@1 reporting healthy telemetry, one hostile device, a rollout
    of digits@2 to all of them (``rollout`` overrides the request body)."""
    fleet = Fleet(manifests=manifests)
    now = dt.datetime.now(dt.timezone.utc)
    for index in range(devices):
        inventory = {**default_inventory("pi4" if index % 2 else "jetson-nano"), "installed": [running(1)]}
        device_id, headers = enroll(http, token, inventory)
        fleet.devices.append(device_id)
        fleet.headers[device_id], fleet.inventories[device_id] = headers, inventory
        # dated before the rollout's clock-skew allowance (5 min), so they do not count against digits@2
        events = [install_event(1, now - dt.timedelta(minutes=30), None), heartbeat(1, now - dt.timedelta(minutes=6))]
        windows = [window(manifests[1], 1, now - dt.timedelta(minutes=m)) for m in (30, 20, 10)]
        report(http, headers, events, windows, [sample(1, now, "7")])
    fleet.hostile = _hostile_device(http, token, manifests, now, fleet)
    body = {
        "bundle": "digits@2",
        "targets": ["all"],
        "waves": "50%,100%",
        "gates": ["error_rate<0.05 min=10"],
        "soak": "1s",
        "device_timeout": "10m",
        "jitter": "0s",
        **(rollout or {}),
    }
    created = http.post(ROLLOUTS, json=body, headers=operator)
    assert created.status_code == 201, created.text
    fleet.rollout_id = created.json()["id"]
    return fleet


def _hostile_device(http: Any, token: str, manifests: dict[int, Any], now: dt.datetime, fleet: Fleet) -> str:
    inventory = {
        **default_inventory(XSS_ATTR),
        "agent_version": XSS_SVG,
        "installed": [running(1, variant=XSS_IMG), {**running(1, name=XSS_SVG), "state": "previous"}],
    }
    device_id, headers = enroll(http, token, inventory)
    fleet.headers[device_id], fleet.inventories[device_id] = headers, inventory
    events = [
        install_event(1, now - dt.timedelta(minutes=5), None, "failed", reason=XSS_IMG),
        heartbeat(1, now - dt.timedelta(minutes=6), XSS_SVG),
    ]
    report(
        http,
        headers,
        events,
        [window(manifests[1], 1, now - dt.timedelta(minutes=6))],
        [sample(1, now, XSS_IMG), sample(1, now, XSS_ATTR)],
    )
    return device_id

"""The device API speaks ``bundles.contract``: what the agent would refuse, the server refuses too (and says where)."""

from __future__ import annotations

import json
import uuid

from bundles.contract import DesiredState, parse

AT = "2026-11-29T12:00:00+00:00"


def telemetry(events: list[dict]) -> bytes:
    return json.dumps({"batch_id": uuid.uuid4().hex, "events": events, "windows": [], "samples": []}).encode()


def test_a_heartbeat_or_install_event_that_breaks_the_contract_is_a_400_naming_the_field(client, make_device):
    device = make_device()
    headers = {**device.headers, "Content-Type": "application/json"}
    bad = [{"id": "h", "type": "heartbeat", "at": AT, "uptime_s": "long"},
           {"id": "i", "type": "install", "at": AT, "model": "digits", "version": 2, "result": "maybe"},
           {"id": "r", "type": "repair", "at": AT, "file": "pointer.json", "reason": "garbage"}]  # fmt: skip
    for event, field in zip(bad, ("uptime_s", "result", "action"), strict=True):
        answer = client.post("/api/v1/device/telemetry", headers=headers, content=telemetry([event]))
        assert answer.status_code == 400 and field in answer.text, answer.text
    good = {"id": "r2", "type": "repair", "at": AT, "file": "pointer.json", "reason": "garbage", "action": "rebuilt"}
    assert client.post("/api/v1/device/telemetry", headers=headers, content=telemetry([good])).status_code == 200


def test_an_inventory_outside_the_contract_bounds_is_refused(client, make_device):
    device = make_device()
    body = {"capabilities": {"arch": "x86_64"}, "installed": [{"name": "d" * 101, "version": 1}]}
    answer = client.put("/api/v1/device/inventory", headers=device.headers, json=body)
    assert answer.status_code == 422 and "installed" in answer.text


def test_the_desired_state_the_server_renders_is_one_the_agent_accepts(client, make_device):
    device = make_device()
    answer = client.get("/api/v1/device/desired-state", headers=device.headers)
    assert answer.status_code == 200
    assert parse(DesiredState, answer.json()).device_id == answer.json()["device_id"]

"""Desired state: ETag / 304, changes seen at once, group poll interval, jitter, own state only."""

from __future__ import annotations

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from fleet_server.db import session_scope, utcnow
from fleet_server.models import Assignment, Device


def _poll(client, device, etag=None):
    headers = {**device.headers, **({"If-None-Match": etag} if etag else {})}
    return client.get("/api/v1/device/desired-state", headers=headers)


def test_unchanged_state_answers_304_with_no_body(client, make_device):
    device = make_device()
    first = _poll(client, device)
    assert first.status_code == 200 and first.headers["etag"].startswith('"')
    body = first.json()
    assert body["device_id"] == device.device_id and body["models"] == []
    assert body["poll_interval_s"] == 300 and body["jitter_s"] == 30
    assert set(body["telemetry"]) == {"window_s", "sample_rate", "reservoir_size", "upload_interval_s"}
    again = _poll(client, device, first.headers["etag"])
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == first.headers["etag"]
    assert _poll(client, device, 'W/"nope", ' + first.headers["etag"]).status_code == 304


def test_an_assignment_written_to_the_table_changes_the_etag(client, make_device, session_factory):
    device = make_device()
    etag = _poll(client, device).headers["etag"]
    with session_scope(session_factory) as session:  # as the rollout engine does
        session.add(Assignment(device_id=device.device_id, model_name="digits", bundle_version=3, rollout_id=17,
                               variant="onnx-fp32"))  # fmt: skip
    changed = _poll(client, device, etag)
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["models"] == [{"name": "digits", "version": 3, "manifest_target": "digits/3/manifest.json",
                                         "variant": "onnx-fp32", "rollout_id": 17, "shadow": None,
                                         "start_after": None}]  # fmt: skip
    with session_scope(session_factory) as session:
        row = session.scalar(select(Assignment).where(Assignment.device_id == device.device_id))
        row.shadow_version, row.start_after, row.updated_at = 4, utcnow(), utcnow()
    shadowed = _poll(client, device, changed.headers["etag"]).json()["models"][0]
    assert shadowed["shadow"] == {"version": 4, "manifest_target": "digits/4/manifest.json"}
    assert shadowed["start_after"] is not None


def test_group_poll_interval_overrides_the_default_and_caps_jitter(client, make_device, operator_headers):
    device, other = make_device(), make_device()
    client.post("/api/v1/admin/groups", headers=operator_headers, json={"name": "canary", "poll_interval_s": 20})
    members = {"device_ids": [device.device_id]}
    client.post("/api/v1/admin/groups/canary/members", headers=operator_headers, json=members)
    state = _poll(client, device).json()
    assert state["poll_interval_s"] == 20 and state["jitter_s"] == 10
    assert _poll(client, other).json()["poll_interval_s"] == 300


def test_each_device_sees_only_its_own_state(client, make_device, session_factory):
    alice, bob = make_device(), make_device()
    with session_scope(session_factory) as session:
        session.add(Assignment(device_id=alice.device_id, model_name="digits", bundle_version=1))
    assert _poll(client, alice).json()["models"][0]["name"] == "digits"
    bob_state = _poll(client, bob).json()
    assert bob_state["device_id"] == bob.device_id and bob_state["models"] == []


def test_bad_tokens_are_401_and_admin_keys_are_not_device_tokens(client, admin_headers):
    assert client.get("/api/v1/device/desired-state").status_code == 401
    assert client.get("/api/v1/device/desired-state", headers={"Authorization": "Bearer efd_nope"}).status_code == 401
    assert client.get("/api/v1/device/desired-state", headers=admin_headers).status_code == 401


def test_polls_record_last_seen_in_one_flush(app, client, make_device, session_factory):
    device = make_device()
    with session_scope(session_factory) as session:
        session.get(Device, device.device_id).last_seen_at = None
    _poll(client, device)
    assert app.state.desired_state.flush_last_seen() == 1
    with session_scope(session_factory) as session:
        assert session.get(Device, device.device_id).last_seen_at is not None


def test_the_fleets_inference_endpoint_is_announced_by_default(app, client, make_device):
    device = make_device()
    public_url = app.state.settings.public_url.rstrip("/")
    assert _poll(client, device).json()["fallback"] == {"url": f"{public_url}/v2", "model": None}


def test_fallback_endpoint_is_announced_when_configured(app, client, make_device, session_factory):
    app.state.settings.fallback_url = "https://cloud.test/v2"
    device = make_device()
    with session_scope(session_factory) as session:
        session.add(Assignment(device_id=device.device_id, model_name="digits", bundle_version=1))
    assert _poll(client, device).json()["fallback"] == {"url": "https://cloud.test/v2", "model": "digits"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_polls_read_on_a_connection_of_their_own_that_cannot_write(app, client, make_device):
    """The poll's query runs inline on the event loop: waiting there for the shared pool stalled every request."""
    device = make_device()
    checkouts = []
    event.listen(app.state.engine, "checkout", lambda *_: checkouts.append(1))
    for _ in range(3):
        assert _poll(client, device).status_code == 200
    assert checkouts == []
    with app.state.desired_state.reader.connect() as connection, pytest.raises(OperationalError, match="readonly"):
        connection.exec_driver_sql("DELETE FROM devices")

"""The rollout admin API: roles, validation, conflicts, controls, show, pins (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from fleet_server.models import AuditEntry

URL = "/api/v1/admin/rollouts"
BODY = {"bundle": "digits@2", "targets": ["group:lab"], "waves": "1%,50%,100%", "gates": ["error_rate<0.01"],
        "soak": "10m", "device_timeout": "5m", "jitter": "0s"}  # fmt: skip


@pytest.fixture
def lab(fleet):
    return fleet.add_devices(6)


def test_reading_needs_viewer_and_changing_needs_operator(client, lab, viewer_headers, operator_headers):
    assert client.get(URL).status_code == 401
    assert client.post(URL, json=BODY, headers=viewer_headers).status_code == 403
    created = client.post(URL, json=BODY, headers=operator_headers)
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    assert client.get(f"{URL}/{rollout_id}", headers=viewer_headers).status_code == 200
    assert [r["id"] for r in client.get(URL, headers=viewer_headers).json()] == [rollout_id]
    assert client.post(f"{URL}/{rollout_id}/pause", headers=viewer_headers).status_code == 403
    assert client.post(f"{URL}/{rollout_id}/pause", headers=operator_headers).json()["state"] == "paused"


def test_create_answers_the_plan(client, lab, operator_headers):
    body = client.post(URL, json=BODY, headers=operator_headers).json()
    assert body["bundle"] == "digits@2" and body["state"] == "running"
    assert [(w["spec"], w["planned_devices"], w["state"]) for w in body["waves"]] == [
        ("1%", 1, "pending"),
        ("50%", 2, "pending"),
        ("100%", 3, "pending"),
    ]
    assert body["policy"]["gates"] == ["error_rate<0.01"] and body["policy"]["soak_s"] == 600
    assert body["devices"] == {"member": 6}
    assert [d["action"] for d in body["decisions"]] == ["create", "start"]


@pytest.mark.parametrize(
    ("change", "status", "detail"),
    [
        ({"gates": ["error_rate=0.01"]}, 400, "is not METRIC<VALUE"),
        ({"gates": ["accuracy>0.9"]}, 400, "unknown metric 'accuracy'"),
        ({"waves": "50%,10%"}, 400, "cumulative"),
        ({"soak": "soon"}, 400, "duration 'soon'"),
        ({"bundle": "digits"}, 400, "NAME@VERSION"),
        ({"bundle": "digits@9"}, 404, "bundle digits@9 is not published"),
        ({"targets": ["group:nope"]}, 404, "device group 'nope' does not exist"),
        ({"targets": ["device:ghost"]}, 404, "device ghost does not exist"),
        ({"on_breach": "explode"}, 422, "on_breach"),
        ({"surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_requests_get_a_clear_4xx(client, lab, operator_headers, change, status, detail):
    response = client.post(URL, json={**BODY, **change}, headers=operator_headers)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]


def test_conflicts_and_wrong_state_actions_are_409(client, lab, operator_headers):
    rollout_id = client.post(URL, json=BODY, headers=operator_headers).json()["id"]
    conflict = client.post(URL, json=BODY, headers=operator_headers)
    assert conflict.status_code == 409
    assert f"are in rollout {rollout_id} of digits, which is running" in conflict.json()["detail"]
    wrong = client.post(f"{URL}/{rollout_id}/resume", headers=operator_headers)
    assert wrong.status_code == 409 and "cannot resume rollout" in wrong.json()["detail"]
    assert client.post(f"{URL}/{rollout_id}/dance", headers=operator_headers).status_code == 422
    assert client.get(f"{URL}/999", headers=operator_headers).status_code == 404


def test_evaluate_now_releases_the_first_wave_and_show_tells_progress(client, lab, fleet, operator_headers):
    rollout_id = client.post(URL, json=BODY, headers=operator_headers).json()["id"]
    body = client.post(f"{URL}/{rollout_id}/evaluate", headers=operator_headers).json()
    first = body["waves"][0]
    assert first["state"] == "running" and first["released"] == 1 and first["outcomes"] == {"installing": 1}
    assert {g["gate"]: g["status"] for g in first["gates"]} == {
        "error_rate<0.01": "wait",
        "install_success>=0.95": "wait",
    }
    detail = client.get(f"{URL}/{rollout_id}?devices=true", headers=operator_headers).json()["device_detail"]
    (released,) = [d for d in detail if d["released_at"]]
    assert released["wave"] == 1 and released["outcome"] == "installing"
    assert fleet.assignment(released["device_id"]).rollout_id == rollout_id


def test_rollback_through_the_api_is_audited_with_the_caller(client, lab, fleet, operator_headers, session_factory):
    rollout_id = client.post(URL, json=BODY, headers=operator_headers).json()["id"]
    client.post(f"{URL}/{rollout_id}/evaluate", headers=operator_headers)
    body = client.post(f"{URL}/{rollout_id}/rollback", headers=operator_headers).json()
    assert body["state"] == "rolled_back" and body["decisions"][-1]["record"]["restore"]["restored"] == 1
    with session_factory() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "rollout.rollback")).one()
    assert entry.actor.startswith("key:") and entry.target_id == str(rollout_id)


def test_pins_through_the_api(client, lab, fleet, operator_headers):
    pinned = client.post("/api/v1/admin/pins", json={"bundle": "digits@1", "targets": [f"device:{lab[0]}"]},
                         headers=operator_headers)  # fmt: skip
    assert pinned.status_code == 200 and pinned.json() == {"pinned": [lab[0]], "not_pinned": []}
    assert fleet.assignment(lab[0]).pinned
    body = client.post(URL, json=BODY, headers=operator_headers).json()
    assert body["devices"] == {"member": 5, "pinned": 1}
    assert body["not_in_rollout"][0]["reason"] == "digits is pinned on this device"
    cleared = client.post("/api/v1/admin/pins/clear", json={"model": "digits", "targets": ["group:lab"]},
                          headers=operator_headers)  # fmt: skip
    assert cleared.json() == {"unpinned": [lab[0]]} and not fleet.assignment(lab[0]).pinned


def test_oversized_input_is_refused_before_any_work(client, lab, operator_headers):
    response = client.post(URL, json={**BODY, "gates": ["error_rate<0.01"] * 33}, headers=operator_headers)
    assert response.status_code == 422 and "gates" in response.json()["detail"]
    response = client.post(URL, json={**BODY, "targets": ["x" * 501]}, headers=operator_headers)
    assert response.status_code == 422

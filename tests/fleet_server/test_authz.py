"""Authorisation: each role's reach, revoked keys, and devices confined to their own rows."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from fleet_server.db import session_scope
from fleet_server.models import AuditEntry, TelemetryBatch
from tests.fleet_server.conftest import auth

READS = ["/api/v1/admin/devices", "/api/v1/admin/groups", "/api/v1/admin/bundles", "/api/v1/admin/audit",
         "/api/v1/admin/assignments", "/api/v1/admin/filters"]  # fmt: skip
OPERATOR_WRITES = [("post", "/api/v1/admin/groups", {"name": "g1"}),
                   ("put", "/api/v1/admin/filters", {"name": "f1", "expression": "hw=pi4"})]  # fmt: skip
ADMIN_WRITES = [("post", "/api/v1/admin/api-keys", {"name": "k", "role": "viewer"}),
                ("post", "/api/v1/admin/enroll-tokens", {"fleet": "lab"})]  # fmt: skip


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
def test_every_role_can_read(client, make_api_key, role):
    headers = auth(make_api_key(role))
    assert [client.get(path, headers=headers).status_code for path in READS] == [200] * len(READS)


def test_viewer_cannot_mutate_anything(client, viewer_headers, make_device):
    device = make_device()
    writes = [*OPERATOR_WRITES, *ADMIN_WRITES, ("post", f"/api/v1/admin/devices/{device.device_id}/reject", None),
              ("post", f"/api/v1/admin/devices/{device.device_id}/tags", {"add": ["x"]}),
              ("post", "/api/v1/admin/publications", None), ("put", "/api/v1/admin/tuf/root", None)]  # fmt: skip
    for method, path, body in writes:
        response = client.request(method, path, headers=viewer_headers, json=body)
        assert response.status_code == 403, (path, response.text)


def test_operator_manages_the_fleet_but_not_keys_or_device_status(client, operator_headers, make_device):
    device = make_device()
    for method, path, body in OPERATOR_WRITES:
        assert client.request(method, path, headers=operator_headers, json=body).status_code in (200, 201)
    for method, path, body in ADMIN_WRITES:
        assert client.request(method, path, headers=operator_headers, json=body).status_code == 403
    assert client.post(f"/api/v1/admin/devices/{device.device_id}/reject", headers=operator_headers).status_code == 403


def test_revoked_key_stops_working_at_once(client, admin_headers, make_api_key):
    created = client.post("/api/v1/admin/api-keys", headers=admin_headers, json={"name": "ci", "role": "viewer"}).json()
    assert client.get("/api/v1/admin/devices", headers=auth(created["secret"])).status_code == 200
    assert client.delete(f"/api/v1/admin/api-keys/{created['id']}", headers=admin_headers).status_code == 200
    assert client.get("/api/v1/admin/devices", headers=auth(created["secret"])).status_code == 401
    listed = client.get("/api/v1/admin/api-keys", headers=admin_headers).json()
    assert all("secret" not in k and "key_hash" not in k for k in listed)


def test_device_tokens_never_open_admin_endpoints(client, make_device):
    device = make_device()
    for path in READS:
        assert client.get(path, headers=device.headers).status_code == 401


def test_device_telemetry_is_stored_under_its_own_id_whatever_the_body_says(client, make_device, session_factory):
    alice, bob = make_device(), make_device()
    body = {"batch_id": "b-1", "device_id": bob.device_id, "events": []}
    assert client.post("/api/v1/device/telemetry", headers=alice.headers, json=body).status_code == 200
    with session_scope(session_factory) as session:
        owners = list(session.scalars(select(TelemetryBatch.device_id)))
    assert owners == [alice.device_id]


def test_every_mutation_is_audited_with_before_and_after(client, admin_headers, make_device, session_factory):
    device = make_device()
    client.post(f"/api/v1/admin/devices/{device.device_id}/reject", headers=admin_headers)
    entry = client.get("/api/v1/admin/audit?action=device.reject", headers=admin_headers).json()[0]
    assert entry["actor"].startswith("key:") and entry["target_id"] == device.device_id
    assert entry["before"]["status"] == "accepted" and entry["after"]["status"] == "rejected"
    with session_scope(session_factory) as session:
        actions = set(session.scalars(select(AuditEntry.action)))
        count = session.scalar(select(func.count()).select_from(AuditEntry))
    assert {"api_key.create", "enroll_token.create", "device.enroll", "device.reject"} <= actions and count >= 4


def test_revoking_twice_is_a_no_op_with_one_audit_entry_and_a_missing_credential_is_404(client, admin_headers):
    key = client.post("/api/v1/admin/api-keys", headers=admin_headers, json={"name": "ci", "role": "viewer"}).json()
    token = client.post("/api/v1/admin/enroll-tokens", headers=admin_headers,
                        json={"fleet": "lab", "expires_in_s": 3600}).json()  # fmt: skip
    for path in (f"/api/v1/admin/api-keys/{key['id']}", f"/api/v1/admin/enroll-tokens/{token['id']}"):
        first = client.delete(path, headers=admin_headers).json()
        again = client.delete(path, headers=admin_headers).json()
        assert first["revoked_at"] and again["revoked_at"] == first["revoked_at"]
    audit = client.get("/api/v1/admin/audit", headers=admin_headers).json()
    actions = [e["action"] for e in audit]
    assert actions.count("api_key.revoke") == 1 and actions.count("enroll_token.revoke") == 1
    for path in ("/api/v1/admin/api-keys/999999", "/api/v1/admin/enroll-tokens/999999"):
        missing = client.delete(path, headers=admin_headers)
        assert missing.status_code == 404 and "does not exist" in missing.json()["detail"]

"""Device enrollment: fleet token + proof of key possession, approval, token revocation, rate limit."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.fleet_server.conftest import default_inventory, enroll_device


def _body(client, token, key, sign_with=None, nonce=None):
    nonce = nonce or client.post("/api/v1/enroll/challenge", json={}).json()["nonce"]
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    signature = (sign_with or key).sign(bytes.fromhex(nonce)).hex()
    return {"token": token, "public_key": public, "nonce": nonce, "signature": signature,
            "inventory": default_inventory()}  # fmt: skip


def test_enrolled_device_gets_a_token_the_tuf_root_and_its_inventory_is_stored(client, make_device, admin_headers):
    device = make_device(hw_class="jetson-orin")
    assert device.status == "accepted" and device.access_token.startswith("efd_")
    assert device.enrollment["tuf"]["metadata_url"] == "https://fleet.test/tuf/metadata/"
    shown = client.get(f"/api/v1/admin/devices/{device.device_id}", headers=admin_headers).json()
    assert shown["hw_class"] == "jetson-orin" and shown["arch"] == "aarch64"
    assert shown["capabilities"]["runtimes"] == {"onnxruntime": "1.20.1"}
    assert "token_hash" not in shown


def test_signature_by_another_key_is_refused(client, make_enroll_token):
    key, impostor = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    response = client.post("/api/v1/enroll", json=_body(client, make_enroll_token(), key, sign_with=impostor))
    assert response.status_code == 401 and "signature" in response.json()["detail"]


def test_a_nonce_can_be_used_only_once(client, make_enroll_token):
    token, key = make_enroll_token(), Ed25519PrivateKey.generate()
    body = _body(client, token, key)
    assert client.post("/api/v1/enroll", json=body).status_code == 200
    replay = client.post("/api/v1/enroll", json=body)
    assert replay.status_code == 401 and "nonce" in replay.json()["detail"]


def test_expired_revoked_and_used_up_tokens_are_refused(client, make_enroll_token, admin_headers):
    expired = make_enroll_token(expires_in_s=-1)
    assert enroll_device(client, expired, default_inventory()).status_code == 401
    once = make_enroll_token(max_uses=1)
    assert enroll_device(client, once, default_inventory()).status_code == 200
    assert enroll_device(client, once, default_inventory()).status_code == 401
    revoked = client.post("/api/v1/admin/enroll-tokens", headers=admin_headers, json={"fleet": "lab"}).json()
    client.delete(f"/api/v1/admin/enroll-tokens/{revoked['id']}", headers=admin_headers)
    assert enroll_device(client, revoked["token"], default_inventory()).status_code == 401


def test_approval_required_keeps_device_pending_until_an_admin_approves(app, client, make_device, admin_headers):
    app.state.settings.require_approval = True
    device = make_device()
    assert device.status == "pending"
    assert client.get("/api/v1/device/desired-state", headers=device.headers).json()["models"] == []
    refused = client.post("/api/v1/device/telemetry", headers=device.headers, json={"batch_id": "b1"})
    assert refused.status_code == 403
    approved = client.post(f"/api/v1/admin/devices/{device.device_id}/approve", headers=admin_headers)
    assert approved.json()["status"] == "accepted"
    assert client.post("/api/v1/device/telemetry", headers=device.headers, json={"batch_id": "b1"}).status_code == 200


def test_rejecting_or_decommissioning_revokes_the_access_token(client, make_device, admin_headers):
    device = make_device()
    client.post(f"/api/v1/admin/devices/{device.device_id}/decommission", headers=admin_headers)
    assert client.get("/api/v1/device/desired-state", headers=device.headers).status_code == 401
    again = enroll_device(client, client.post("/api/v1/admin/enroll-tokens", headers=admin_headers,
                                              json={"fleet": "lab"}).json()["token"], default_inventory(),
                          device.private_key)  # fmt: skip
    assert again.status_code == 403 and "decommissioned" in again.json()["detail"]


def test_re_enrolling_the_same_key_keeps_the_device_and_rotates_its_token(client, make_enroll_token, make_device):
    device = make_device()
    again = enroll_device(client, make_enroll_token(), default_inventory(), device.private_key).json()
    assert again["device_id"] == device.device_id and again["access_token"] != device.access_token
    assert client.get("/api/v1/device/desired-state", headers=device.headers).status_code == 401
    new_headers = {"Authorization": f"Bearer {again['access_token']}"}
    assert client.get("/api/v1/device/desired-state", headers=new_headers).status_code == 200


def test_enrollment_is_rate_limited_per_client(app, client):
    from fleet_server.ratelimit import RateLimiter

    app.state.enroll_limiter = RateLimiter(3)
    statuses = [client.post("/api/v1/enroll/challenge", json={}).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]


def test_malformed_enrollment_fields_are_422_with_the_field_named(client, make_enroll_token):
    body = {"token": make_enroll_token(), "public_key": "zz", "nonce": "00", "signature": "00"}
    response = client.post("/api/v1/enroll", json=body)
    assert response.status_code == 422 and response.json()["detail"].startswith("public_key")


def test_bad_inventory_is_a_clear_400(client, make_enroll_token):
    response = enroll_device(client, make_enroll_token(), {"capabilities": {"arch": 3}})
    assert response.status_code == 400 and "arch" in response.json()["detail"]


def test_inventory_update_replaces_the_reported_inventory(client, make_device, admin_headers):
    device = make_device()
    inventory = default_inventory()
    inventory["capabilities"]["runtimes"] = {"onnxruntime": "1.22.0", "tflite": "2.16"}
    inventory["installed"] = [{"name": "tiny", "version": 1, "variant": "onnx-fp32", "slot": "a", "state": "active"}]
    assert client.put("/api/v1/device/inventory", headers=device.headers, json=inventory).status_code == 204
    shown = client.get(f"/api/v1/admin/devices/{device.device_id}", headers=admin_headers).json()
    assert shown["capabilities"]["runtimes"]["tflite"] == "2.16" and shown["installed"][0]["slot"] == "a"
    assert shown["last_seen_at"] is not None

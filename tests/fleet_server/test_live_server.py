"""The real server on loopback: a device enrolls over HTTP, polls, and downloads its bundle through TUF."""

from __future__ import annotations

import json

import httpx

from bundles.tuf.client import TufClient
from tests.fleet_server.conftest import default_inventory, enroll_device


def test_device_enrolls_polls_and_verifies_its_bundle_through_tuf(live_server, release, admin_headers,
                                                                   make_enroll_token, tmp_path):  # fmt: skip
    release.publish("tiny", 1)
    with httpx.Client(base_url=live_server, timeout=10) as http:
        enrolled = enroll_device(http, make_enroll_token(), default_inventory()).json()
        device_headers = {"Authorization": f"Bearer {enrolled['access_token']}"}
        pin = {"device_id": enrolled["device_id"], "model_name": "tiny", "bundle_version": 1}
        assert http.put("/api/v1/admin/assignments", headers=admin_headers, json=pin).status_code == 200
        state = http.get("/api/v1/device/desired-state", headers=device_headers)
        conditional = {**device_headers, "If-None-Match": state.headers["etag"]}
        again = http.get("/api/v1/device/desired-state", headers=conditional)
    assert again.status_code == 304
    target = state.json()["models"][0]["manifest_target"]
    client = TufClient(tmp_path / "meta", tmp_path / "targets", f"{live_server}/tuf/metadata/",
                       f"{live_server}/tuf/targets/", trusted_root=json.dumps(enrolled["tuf"]["root"]).encode(),
                       bearer_token=enrolled["access_token"])  # fmt: skip
    client.refresh()
    manifest = json.loads(client.download(target).read_bytes())
    assert (manifest["name"], manifest["version"]) == ("tiny", 1)
    variant = client.download("tiny/1/onnx-fp32.tar.gz")
    assert variant.stat().st_size == client.target_info("tiny/1/onnx-fp32.tar.gz").length

"""Publications, the bundle registry and TUF hosting, with real TUF metadata and real bundles."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from fleet_server.db import session_scope
from fleet_server.models import Device


def _tampered(publication: Path, out: Path) -> Path:
    """The same publication with one byte of the variant archive flipped (signature still valid)."""
    with tarfile.open(publication, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else b""
            if member.name.endswith(".tar.gz"):
                data = data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out


def test_publication_is_verified_then_recorded_as_a_bundle(client, release, admin_headers):
    answer = release.publish("tiny", 1)
    assert answer["bundles"] == [{"name": "tiny", "version": 1}]
    assert sorted(answer["targets"]) == ["tiny/1/manifest.json", "tiny/1/onnx-fp32.tar.gz"]
    bundle = client.get("/api/v1/admin/bundles/tiny/1", headers=admin_headers).json()
    assert bundle["manifest"]["name"] == "tiny" and bundle["manifest_target"] == "tiny/1/manifest.json"
    assert [v["id"] for v in bundle["variants"]] == ["onnx-fp32"]
    assert bundle["variants"][0]["tuf_target"] == "tiny/1/onnx-fp32.tar.gz" and bundle["size_bytes"] > 0


def test_tampered_publication_is_refused_and_nothing_is_recorded(client, release, admin_headers, tmp_path):
    bad = _tampered(release.publication("tiny", 1), tmp_path / "bad.tar.gz")
    response = client.post("/api/v1/admin/publications", headers=admin_headers, content=bad.read_bytes())
    assert response.status_code == 400, response.text
    assert "tiny/1/onnx-fp32.tar.gz" in response.json()["detail"]
    assert client.get("/api/v1/admin/bundles", headers=admin_headers).json() == []
    assert client.get("/api/v1/admin/tuf/state", headers=admin_headers).json()["targets"] is None


def test_publication_signed_by_an_unknown_key_is_refused(client, release, admin_headers, tmp_path):
    from bundles.tuf.keys import generate_key
    from bundles.tuf.publication import make_publication
    from bundles.tuf.root import make_root

    rogue = generate_key(tmp_path / "rogue.pem")
    forged_root = make_root([rogue], [rogue], rogue, rogue)  # a root only the attacker trusts
    forged = make_publication(None, forged_root, release.bundle_files("tiny", 1), rogue, tmp_path / "forged.tar.gz")
    response = client.post("/api/v1/admin/publications", headers=admin_headers, content=forged.read_bytes())
    assert response.status_code == 400, response.text
    assert client.get("/api/v1/admin/bundles", headers=admin_headers).json() == []


def test_replayed_publication_is_a_version_conflict(client, release, admin_headers):
    first = release.publication("tiny", 1)
    accepted = client.post("/api/v1/admin/publications", headers=admin_headers, content=first.read_bytes())
    assert accepted.status_code == 201
    again = client.post("/api/v1/admin/publications", headers=admin_headers, content=first.read_bytes())
    assert again.status_code == 409, again.text


def test_publication_over_the_size_cap_is_413(client, release, admin_headers, app):
    app.state.settings.max_publication_bytes = 1024
    response = client.post("/api/v1/admin/publications", headers=admin_headers,
                           content=release.publication("tiny", 1).read_bytes())  # fmt: skip
    assert response.status_code == 413


def test_garbage_publication_is_400_not_500(client, release, admin_headers):
    response = client.post("/api/v1/admin/publications", headers=admin_headers, content=b"not a tarball")
    assert response.status_code == 400, response.text


def test_metadata_caching_headers(client, release):
    release.publish("tiny", 1)
    timestamp = client.get("/tuf/metadata/timestamp.json")
    assert timestamp.status_code == 200 and timestamp.headers["cache-control"] == "no-cache"
    versioned = client.get("/tuf/metadata/1.targets.json")
    assert versioned.status_code == 200 and "immutable" in versioned.headers["cache-control"]
    assert client.get("/tuf/metadata/../keys/snapshot.pem").status_code == 404
    assert client.get("/tuf/metadata/7.targets.json").status_code == 404


def test_target_range_request_answers_206_with_exactly_those_bytes(client, release, admin_headers):
    release.publish("tiny", 1)
    targets = client.get("/api/v1/admin/tuf/state", headers=admin_headers).json()["targets"]["signed"]["targets"]
    info = targets["tiny/1/onnx-fp32.tar.gz"]
    url = f"/tuf/targets/tiny/1/{info['hashes']['sha256']}.onnx-fp32.tar.gz"
    full = client.get(url)
    assert full.status_code == 200 and len(full.content) == info["length"]
    assert "immutable" in full.headers["cache-control"] and full.headers["accept-ranges"] == "bytes"
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == full.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{info['length']}"
    tail = client.get(url, headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == full.content[-50:]
    beyond = client.get(url, headers={"Range": f"bytes={info['length']}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{info['length']}"


def test_target_paths_cannot_escape_the_repository(client, release):
    release.publish("tiny", 1)
    for path in ("../keys/snapshot.pem", "..%2F..%2Fserver.env", "/etc/passwd", "tiny/1/missing.tar.gz"):
        assert client.get(f"/tuf/targets/{path}").status_code == 404, path


def test_delete_is_refused_while_a_device_is_assigned_the_bundle(client, release, admin_headers, make_device):
    release.publish("tiny", 1)
    device = make_device()
    pin = {"device_id": device.device_id, "model_name": "tiny", "bundle_version": 1}
    assert client.put("/api/v1/admin/assignments", headers=admin_headers, json=pin).status_code == 200
    refused = client.delete("/api/v1/admin/bundles/tiny/1", headers=admin_headers)
    assert refused.status_code == 409 and device.device_id in refused.json()["detail"]
    assert client.delete(f"/api/v1/admin/assignments/{device.device_id}/tiny", headers=admin_headers).status_code == 204
    assert client.delete("/api/v1/admin/bundles/tiny/1", headers=admin_headers).status_code == 204
    assert client.get("/api/v1/admin/bundles/tiny/1", headers=admin_headers).status_code == 404


def test_delete_is_refused_while_a_device_reports_the_bundle_installed(
    client, release, admin_headers, make_device, session_factory
):
    release.publish("tiny", 1)
    device = make_device()
    with session_scope(session_factory) as session:
        session.get(Device, device.device_id).installed = [{"name": "tiny", "version": 1, "state": "active"}]
    assert client.delete("/api/v1/admin/bundles/tiny/1", headers=admin_headers).status_code == 409


def test_deprecate_marks_and_undo_clears(client, release, operator_headers):
    release.publish("tiny", 1)
    marked = client.post("/api/v1/admin/bundles/tiny/1/deprecate", headers=operator_headers)
    assert marked.status_code == 200 and marked.json()["deprecated"] is True
    cleared = client.post("/api/v1/admin/bundles/tiny/1/deprecate?undo=true", headers=operator_headers)
    assert cleared.json()["deprecated"] is False


def test_a_deprecated_version_takes_no_new_assignment_pin_or_rollout(client, release, operator_headers, make_device):
    release.publish("tiny", 1)
    device = make_device()
    assert client.post("/api/v1/admin/bundles/tiny/1/deprecate", headers=operator_headers).status_code == 200
    attempts = [
        client.put("/api/v1/admin/assignments", headers=operator_headers,
                   json={"device_id": device.device_id, "model_name": "tiny", "bundle_version": 1}),
        client.post("/api/v1/admin/pins", headers=operator_headers,
                    json={"bundle": "tiny@1", "targets": [f"device:{device.device_id}"]}),
        client.post("/api/v1/admin/rollouts", headers=operator_headers,
                    json={"bundle": "tiny@1", "targets": [f"device:{device.device_id}"]}),
    ]  # fmt: skip
    assert [a.status_code for a in attempts] == [409, 409, 409]
    assert all("tiny@1 is deprecated" in a.json()["detail"] for a in attempts)
    client.post("/api/v1/admin/bundles/tiny/1/deprecate?undo=true", headers=operator_headers)
    pin = {"device_id": device.device_id, "model_name": "tiny", "bundle_version": 1}
    assert client.put("/api/v1/admin/assignments", headers=operator_headers, json=pin).status_code == 200


def test_a_signed_targets_version_that_drops_a_bundle_marks_it_revoked(client, release, admin_headers):
    from bundles.tuf.publication import make_publication

    release.publish("tiny", 1)
    release.publish("tiny", 2)
    current = release.current_targets_bytes()
    dropped = [p for p in json.loads(current)["signed"]["targets"] if p.startswith("tiny/1/")]
    out = make_publication(current, release.root_bytes(), {}, release.targets_signer, release.work_dir / "revoke.tgz",
                           remove=dropped)  # fmt: skip
    assert client.post("/api/v1/admin/publications", headers=admin_headers, content=out.read_bytes()).status_code == 201
    listed = {b["version"]: b["deprecated"] for b in client.get("/api/v1/admin/bundles", headers=admin_headers).json()}
    assert listed == {2: False, 1: True}
    audit = client.get("/api/v1/admin/audit", headers=admin_headers).json()
    assert any(e["action"] == "bundle.revoke" and e["target_id"] == "tiny@1" for e in audit)


def test_second_publication_adds_a_version_and_keeps_the_first(client, release, admin_headers):
    release.publish("tiny", 1)
    release.publish("tiny", 2)
    listed = client.get("/api/v1/admin/bundles?name=tiny", headers=admin_headers).json()
    assert [b["version"] for b in listed] == [2, 1]


def test_refresh_resigns_timestamp_when_it_is_close_to_expiry(app, client, release):
    release.publish("tiny", 1)
    before = client.get("/tuf/metadata/timestamp.json").json()["signed"]["version"]
    app.state.settings.timestamp_expiry_s = 10 * 86_400  # the current one (1 day) is now "due"
    assert "timestamp" in app.state.tuf.refresh()
    assert client.get("/tuf/metadata/timestamp.json").json()["signed"]["version"] == before + 1


def test_tuf_state_before_init_is_a_clear_409(client, admin_headers):
    response = client.get("/api/v1/admin/tuf/state", headers=admin_headers)
    assert response.status_code == 409 and "edgefleet-server init" in response.json()["detail"]


def test_publication_before_a_root_is_installed_is_refused(client, admin_headers, online_keys):
    response = client.post("/api/v1/admin/publications", headers=admin_headers, content=b"x" * 100)
    assert response.status_code == 400 and "root" in response.json()["detail"]


def test_root_installation_is_audited(client, release, admin_headers):
    entry = client.get("/api/v1/admin/audit?action=tuf.root", headers=admin_headers).json()[0]
    assert entry["before"] is None and entry["after"]["version"] == 1 and entry["actor"].startswith("key:")


def test_delete_is_refused_while_an_unfinished_rollout_targets_the_bundle(client, release, admin_headers,
                                                                          session_factory):  # fmt: skip
    from fleet_server.rollouts.models import Rollout

    release.publish("tiny", 1)
    with session_scope(session_factory) as session:
        session.add(Rollout(model_name="tiny", bundle_version=1, state="paused", policy={}, target={}, created_by="t"))
    refused = client.delete("/api/v1/admin/bundles/tiny/1", headers=admin_headers)
    assert refused.status_code == 409 and "rollout" in refused.json()["detail"]
    with session_scope(session_factory) as session:
        session.query(Rollout).update({"state": "completed"})
    assert client.delete("/api/v1/admin/bundles/tiny/1", headers=admin_headers).status_code == 204

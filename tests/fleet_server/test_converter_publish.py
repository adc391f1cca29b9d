"""The admin publish contract with the real client: ``converter.publish.publish_bundle`` against the server."""

from __future__ import annotations

from bundles.testing import build_bundle_dir
from converter.home import Home
from converter.publish import ServerDestination, init_keys, publish_bundle
from tests.fleet_server.conftest import auth


def test_converter_publishes_two_versions_through_the_admin_api(live_server, online_keys, make_api_key, client,
                                                                 tmp_path):  # fmt: skip
    home = Home(tmp_path / "workstation")
    init_keys(home)
    key = make_api_key("operator")
    admin = make_api_key("admin")
    first = _publish(home, _bundle(tmp_path, 1), live_server, admin)  # installs root v1 first (admin)
    second = _publish(home, _bundle(tmp_path, 2), live_server, key)
    assert "tiny/1/manifest.json" in first and "tiny/2/manifest.json" in second
    listed = client.get("/api/v1/admin/bundles?name=tiny", headers=auth(key)).json()
    assert [b["version"] for b in listed] == [2, 1]
    assert client.get("/tuf/metadata/timestamp.json").json()["signed"]["version"] >= 2


def _publish(home, bundle_dir, url, api_key):
    destination = ServerDestination(url, api_key)
    try:
        return publish_bundle(home, destination, bundle_dir, confirm=lambda plan: True).accepted
    finally:
        destination.close()


def _bundle(tmp_path, version: int):
    bundle_dir = tmp_path / f"tiny-{version}"
    build_bundle_dir(bundle_dir, name="tiny", version=version)
    return bundle_dir

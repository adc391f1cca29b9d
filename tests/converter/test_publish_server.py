"""``publish --server`` against a real fleet server on loopback (SQLite, uvicorn, admin API key)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bundles.manifest import Manifest
from bundles.tuf.client import TufClient
from tests.converter.helpers import cli, ok, register_cnn

PEPPER = "converter-test-pepper-0123456789"


@pytest.fixture()
def fleet_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A migrated SQLite fleet server with online TUF keys, served by uvicorn; yields (url, admin key)."""
    import uvicorn

    from fleet_server.app import create_app
    from fleet_server.db import session_scope, upgrade_database
    from fleet_server.services.api_keys import create_api_key
    from fleet_server.settings import Settings

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade_database(url)
    settings = Settings(mode="production", data_dir=tmp_path / "data", database_url=url, public_url="https://fleet.test",
                        token_pepper=PEPPER, background_tasks=False, json_logs=False, log_level="warning")  # fmt: skip
    settings.data_dir.mkdir(parents=True)
    app = create_app(settings)
    app.state.tuf.create_online_keys()
    with session_scope(app.state.session_factory) as session:
        _, secret = create_api_key(session, name="release", role="admin", actor="test", pepper=PEPPER)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", secret
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_publish_to_a_fleet_server_installs_root_uploads_and_devices_can_verify(
    home: Path, digits_cnn: object, fleet_server: tuple[str, str], tmp_path: Path
) -> None:
    url, api_key = fleet_server
    register_cnn("digits", digits_cnn, "--max-latency-ratio", "5")
    ok("convert", "digits", "--targets", "onnx", "--quantize", "fp32,int8-static")
    ok("keys", "init")
    code, _, err = cli("publish", "digits", "--server", url, "--api-key", "wrong")
    assert code == 1 and err.startswith("error: fleet server refused the API key (401")
    out = ok("publish", "digits", "--server", url, "--api-key", api_key, "--yes")
    assert "digits/1/manifest.json" in out and "digits/1/onnx-int8-static.tar.gz" in out
    assert "plots for the dashboard: report, agreement" in out
    report_dir, bearer = home / "reports" / "digits" / "1" / "conversion-1", {"Authorization": f"Bearer {api_key}"}
    for kind, filename in (("report", "plot.png"), ("agreement", "agreement.png")):
        plot = httpx.get(f"{url}/api/v1/admin/bundles/digits/1/plots/{kind}", headers=bearer)
        assert plot.status_code == 200 and plot.content == (report_dir / filename).read_bytes()  # unsigned, as made

    listed = httpx.get(f"{url}/api/v1/admin/bundles", headers={"Authorization": f"Bearer {api_key}"}).json()
    assert [(b["name"], b["version"]) for b in listed] == [("digits", 1)]
    root = httpx.get(f"{url}/tuf/metadata/1.root.json").content
    with TufClient(tmp_path / "dev" / "m", tmp_path / "dev" / "t", f"{url}/tuf/metadata/", f"{url}/tuf/targets/",
                   trusted_root=root) as client:  # fmt: skip
        client.refresh()
        manifest = Manifest.from_bytes(client.download("digits/1/manifest.json").read_bytes())
    assert {v.id for v in manifest.variants} == {"onnx-fp32", "onnx-int8-static"}

    ok("publish", "digits", "--server", url, "--api-key", api_key, "--yes")  # the same bytes again: re-signed
    ok("convert", "digits", "--targets", "onnx", "--quantize", "fp32")  # a different bundle for the same version
    code, _, err = cli("publish", "digits", "--server", url, "--api-key", api_key, "--yes")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: model digits@1 is already published with different content")

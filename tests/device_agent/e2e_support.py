"""A real fleet server on loopback and real agent processes, for tests/e2e/test_agent_*.py.

:class:`Fleet` runs ``fleet_server.app.create_app`` under uvicorn in a thread (SQLite, dev mode so
the public URL can be plain http on 127.0.0.1), installs a TUF root made with offline keys like a
release workstation would, and publishes real tiny ONNX bundles through the admin API.
:func:`agent_cli` runs ``edgefleet-agent`` as a separate process.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bundles.archive import pack_variant
from bundles.testing import build_bundle_dir, with_golden_offset, write_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
PEPPER = "agent-e2e-pepper-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fleet:
    """The fleet server under test plus a release workstation's keys."""

    def __init__(self, work: Path, install_root: bool = True) -> None:
        import uvicorn

        from fleet_server.app import create_app
        from fleet_server.db import upgrade_database
        from fleet_server.settings import Settings

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        db_url = f"sqlite:///{work / 'fleet.db'}"
        upgrade_database(db_url)
        self.settings = Settings(
            mode="dev",
            data_dir=work / "server",
            database_url=db_url,
            public_url=self.url,
            token_pepper=PEPPER,
            background_tasks=False,
            json_logs=False,
            log_level="warning",
        )
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.app = create_app(self.settings)
        self.app.state.tuf.create_online_keys()
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "the fleet server did not start"
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.admin_key = self._admin_key()
        self.admin = {"Authorization": f"Bearer {self.admin_key}"}
        if install_root:  # else a release workstation (edgefleet-convert publish) installs it
            self._install_root()

    def _admin_key(self) -> str:
        from fleet_server.db import session_scope
        from fleet_server.services.api_keys import create_api_key

        with session_scope(self.app.state.session_factory) as session:
            _, secret = create_api_key(session, name="agent-e2e", role="admin", actor="test", pepper=PEPPER)
        return secret

    def _install_root(self) -> None:
        from bundles.tuf.keys import generate_key, key_from_dict
        from bundles.tuf.root import make_root

        keys = self.work / "release-keys"
        keys.mkdir()
        root_signer, self.targets_signer = generate_key(keys / "root.pem"), generate_key(keys / "targets.pem")
        online = self.http.get("/api/v1/admin/tuf/state", headers=self.admin).json()["online_keys"]
        root = make_root([root_signer], [self.targets_signer], key_from_dict(online["snapshot"]),
                         key_from_dict(online["timestamp"]))  # fmt: skip
        answer = self.http.put("/api/v1/admin/tuf/root", headers=self.admin, content=root)
        assert answer.status_code == 200, answer.text

    def publish(self, name: str, version: int, bad_golden: bool = False) -> None:
        """Build a real tiny bundle (golden outputs shifted if ``bad_golden``), sign and publish it."""
        from bundles.tuf.publication import make_publication

        src = self.work / f"src-{name}-{version}"
        manifest = build_bundle_dir(src, name=name, version=version, seed=version)
        if bad_golden:
            manifest = with_golden_offset(manifest, 1.0)
            write_manifest(src, manifest)
        files = {f"{name}/{version}/manifest.json": src / "manifest.json"}
        for variant in manifest.variants:
            out = pack_variant(src, manifest, variant.id, self.work / f"{name}-{version}-{variant.id}.tar.gz")
            files[f"{name}/{version}/{variant.id}.tar.gz"] = out
        state = self.http.get("/api/v1/admin/tuf/state", headers=self.admin).json()
        current = None
        if state["targets"] is not None:
            current = self.http.get(f"/tuf/metadata/{state['targets']['signed']['version']}.targets.json").content
        root = self.http.get("/tuf/metadata/root.json").content
        out = self.work / f"publication-{uuid.uuid4().hex[:8]}.tar.gz"
        publication = make_publication(current, root, files, self.targets_signer, out)
        answer = self.http.post("/api/v1/admin/publications", headers=self.admin, content=publication.read_bytes())
        assert answer.status_code == 201, answer.text

    def enroll_token(self) -> str:
        answer = self.http.post("/api/v1/admin/enroll-tokens", headers=self.admin,
                                json={"fleet": "lab", "expires_in_s": 3600})  # fmt: skip
        assert answer.status_code == 201, answer.text
        return str(answer.json()["token"])

    def assign(self, device_id: str, name: str, version: int) -> None:
        body = {"device_id": device_id, "model_name": name, "bundle_version": version}
        answer = self.http.put("/api/v1/admin/assignments", headers=self.admin, json=body)
        assert answer.status_code == 200, answer.text

    def stored_target(self, target_path: str) -> Path:
        """The server's file for a TUF target (hash-prefixed name)."""
        directory, base = target_path.rsplit("/", 1)
        found = list((self.settings.tuf_dir / "targets" / directory).glob(f"*.{base}"))
        assert len(found) == 1, found
        return found[0]

    def install_events(self, device_id: str) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        from fleet_server.models import DeviceEvent

        with self.app.state.session_factory() as session:
            rows = session.execute(
                sa.select(DeviceEvent.payload).where(DeviceEvent.device_id == device_id, DeviceEvent.type == "install")
            ).scalars()
            return [dict(r) for r in rows]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.http.close()
        self.sock.close()


def agent_env(state_dir: Path, **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_AGENT_")}
    env.update({"EDGEFLEET_AGENT_STATE_DIR": str(state_dir), "EDGEFLEET_AGENT_MIN_FREE_DISK_BYTES": "0",
                "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    env.update({f"EDGEFLEET_AGENT_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def agent_cli(state_dir: Path, *args: str, timeout_s: float = 120, **settings: Any) -> subprocess.CompletedProcess[str]:
    """Run ``edgefleet-agent ARGS`` as its own process and wait for it."""
    return subprocess.run([sys.executable, "-m", "device_agent", *args], env=agent_env(state_dir, **settings),
                          capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT)  # fmt: skip


@dataclasses.dataclass
class Daemon:
    """``edgefleet-agent run`` in the background, serving the OIP API on ``port``."""

    process: subprocess.Popen[str]
    url: str

    def wait_ready(self, model: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read() if self.process.stderr else "daemon died"
            try:
                if httpx.get(f"{self.url}/v2/models/{model}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the agent did not serve {model} within {timeout_s} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


def start_daemon(state_dir: Path, **settings: Any) -> Iterator[Daemon]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "device_agent", "run", "--port", str(port)],
                               env=agent_env(state_dir, **settings), cwd=REPO_ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    daemon = Daemon(process, f"http://127.0.0.1:{port}")
    try:
        yield daemon
    finally:
        if process.poll() is None:
            daemon.stop()

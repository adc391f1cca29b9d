"""The fleet server(s) a simulation runs against, and the operator's and release engineer's sides.

:class:`ServerCluster` does what an admin does: ``edgefleet-server init`` once (a fresh SQLite file,
or a fresh PostgreSQL database that is dropped afterwards), then N ``edgefleet-server run`` processes
on one data directory and one database (stateless API processes; one of them takes the background
leadership). It can kill the leader (``SIGKILL``, as a crashed node) and start it again.

:class:`Operator` speaks the admin API (enrollment token, rollouts, rollout views) and plays the
release workstation: an offline root and targets key, the root installed on the server, and each
bundle built (``bundles.testing``: a real tiny ONNX classifier with golden cases and a drift
baseline), signed and published as a TUF publication, exactly as ``edgefleet-convert publish`` does.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bundles.errors import ConfigError, EdgeFleetError
from simulators.fleet.scenario import ServerSpec

MODEL = "digits"


class SimulationError(EdgeFleetError):
    """The simulation could not run (the server did not start, an admin call failed); the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerCluster:
    """``edgefleet-server`` processes on one data dir and database (see the module docstring)."""

    def __init__(self, spec: ServerSpec, work_dir: Path) -> None:
        self.spec, self.work_dir = spec, work_dir
        self.data_dir = work_dir / "server"
        self.ports = [free_port() for _ in range(spec.processes)]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * spec.processes
        self.pg_database: str | None = None
        self.admin_key = ""
        self.env = {
            **os.environ, "EDGEFLEET_MODE": "dev", "EDGEFLEET_LOG_LEVEL": "warning", "EDGEFLEET_JSON_LOGS": "false",
            "EDGEFLEET_ROLLOUT_TICK_S": str(spec.rollout_tick_s), "EDGEFLEET_LEADER_CHECK_S": "1",
            "EDGEFLEET_TELEMETRY_WINDOW_S": str(spec.telemetry_window_s),
            "EDGEFLEET_TELEMETRY_UPLOAD_INTERVAL_S": str(spec.telemetry_window_s),
            "EDGEFLEET_POLL_INTERVAL_S": str(spec.poll_interval_s), "EDGEFLEET_JITTER_S": str(spec.jitter_s),
            "EDGEFLEET_ENROLL_RATE_PER_MINUTE": "10000000", "PYTHONWARNINGS": "ignore",
        }  # fmt: skip
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        self._init()
        for i in range(len(self.ports)):
            self.start_process(i)
        for i in range(len(self.ports)):
            self.wait_ready(i)

    def _database_url(self) -> str | None:
        if self.spec.database != "postgresql":
            return None
        import sqlalchemy as sa

        self.pg_database = f"edgefleet_sim_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(self.spec.pg_admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{self.pg_database}"'))
        except sa.exc.SQLAlchemyError as e:
            raise SimulationError(f"cannot create a PostgreSQL database on {self.spec.pg_admin_url}: {e}") from e
        finally:
            admin.dispose()
        return self.spec.pg_admin_url.rsplit("/", 1)[0] + f"/{self.pg_database}"

    def _init(self) -> None:
        args = [sys.executable, "-m", "fleet_server.cli", "init", "--dev", "--data-dir", str(self.data_dir),
                "--public-url", self.url]  # fmt: skip
        database_url = self._database_url()
        if database_url:
            args += ["--database-url", database_url]
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=300, check=False)
        match = re.search(r"efk_\S+", done.stdout)
        if done.returncode != 0 or match is None:
            raise SimulationError(f"edgefleet-server init failed: {(done.stdout + done.stderr)[-800:]}")
        self.admin_key = match.group(0)

    def start_process(self, index: int) -> None:
        args = [sys.executable, "-m", "fleet_server.cli", "run", "--data-dir", str(self.data_dir), "--port",
                str(self.ports[index])]  # fmt: skip
        log = (self.work_dir / f"server-{index}.log").open("ab")
        self.processes[index] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)  # fmt: skip
        log.close()

    def wait_ready(self, index: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.ports[index]}/readyz"
        while time.monotonic() < deadline:
            proc = self.processes[index]
            if proc is not None and proc.poll() is not None:
                log = (self.work_dir / f"server-{index}.log").read_text(errors="replace")[-1500:]
                raise SimulationError(f"server process {index} exited with {proc.returncode}: {log}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SimulationError(f"server process {index} was not ready within {timeout_s:.0f} s")

    def leader_index(self) -> int | None:
        """Which process runs the background loops (``edgefleet_background_leader`` in its ``/metrics``)."""
        for i, port in enumerate(self.ports):
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                continue
            if re.search(r"^edgefleet_background_leader(?:\{[^}]*\})? 1(\.0)?$", text, re.MULTILINE):
                return i
        return None

    def metrics(self, index: int) -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{self.ports[index]}/metrics", timeout=5).text
        except httpx.HTTPError:
            return ""

    def kill(self, index: int) -> None:
        """SIGKILL the process group (no shutdown hook runs, the leadership is not handed over)."""
        proc = self.processes[index]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p is not None and p.poll() is None]

    def stop(self) -> None:
        for proc in self.processes:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for i, proc in enumerate(self.processes):
            if proc is None:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill(i)
        self._drop_database()

    def _drop_database(self) -> None:
        if self.pg_database is None:
            return
        import sqlalchemy as sa

        admin = sa.create_engine(self.spec.pg_admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.pg_database}" WITH (FORCE)'))
        except sa.exc.SQLAlchemyError:
            pass  # left behind; named edgefleet_sim_* so it can be found
        finally:
            admin.dispose()


class Operator:
    """The admin API and the release workstation (see the module docstring)."""

    def __init__(self, url: str, admin_key: str, work_dir: Path) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
        self.work_dir = work_dir / "release"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.targets_signer: Any = None

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise SimulationError(f"{method} {path} failed: {e}") from e
        if response.status_code >= 400:
            raise SimulationError(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def install_root(self) -> None:
        from bundles.tuf.keys import generate_key, key_from_dict
        from bundles.tuf.root import make_root

        root_signer = generate_key(self.work_dir / "root.pem", overwrite=True)
        self.targets_signer = generate_key(self.work_dir / "targets.pem", overwrite=True)
        online = self.call("GET", "/api/v1/admin/tuf/state")["online_keys"]
        root = make_root([root_signer], [self.targets_signer], key_from_dict(online["snapshot"]),
                         key_from_dict(online["timestamp"]))  # fmt: skip
        self.call("PUT", "/api/v1/admin/tuf/root", content=root)

    def publish(self, version: int) -> Any:
        """Build digits@version (a real tiny ONNX bundle), sign it with the release key and publish it."""
        from bundles.archive import pack_variant
        from bundles.testing import build_bundle_dir
        from bundles.tuf.publication import make_publication

        bundle_dir = self.work_dir / f"{MODEL}-{version}"
        manifest = build_bundle_dir(bundle_dir, name=MODEL, version=version, seed=0)
        files = {f"{MODEL}/{version}/manifest.json": bundle_dir / "manifest.json"}
        for variant in manifest.variants:
            archive = pack_variant(bundle_dir, manifest, variant.id, self.work_dir / f"{version}-{variant.id}.tgz")
            files[f"{MODEL}/{version}/{variant.id}.tar.gz"] = archive
        state = self.call("GET", "/api/v1/admin/tuf/state")
        current = None
        if state["targets"] is not None:
            number = state["targets"]["signed"]["version"]
            current = self.http.get(f"/tuf/metadata/{number}.targets.json").content
        root = self.http.get("/tuf/metadata/root.json").content
        out = self.work_dir / f"publication-{version}.tar.gz"
        make_publication(current, root, files, self.targets_signer, out)
        self.call("POST", "/api/v1/admin/publications", content=out.read_bytes())
        return manifest

    def enroll_token(self) -> str:
        return str(
            self.call("POST", "/api/v1/admin/enroll-tokens", json={"fleet": "sim", "expires_in_s": 86_400})["token"]
        )

    def create_rollout(self, body: dict[str, Any]) -> int:
        return int(self.call("POST", "/api/v1/admin/rollouts", json=body)["id"])

    def rollout(self, rollout_id: int, devices: bool = False) -> dict[str, Any]:
        suffix = "?devices=true" if devices else ""
        view: dict[str, Any] = self.call("GET", f"/api/v1/admin/rollouts/{rollout_id}{suffix}")
        return view

    def close(self) -> None:
        self.http.close()


def check_database_choice(spec: ServerSpec) -> None:
    if spec.database == "postgresql" and not spec.pg_admin_url.startswith("postgresql"):
        raise ConfigError("scenario: [server] pg_admin_url must be a postgresql:// URL")

"""Races between two server processes: ``edgefleet-server run --workers 2`` on PostgreSQL (and SQLite).

Each test fires twelve requests at once (a barrier releases them together, over separate
connections, so the kernel spreads them over both worker processes) and checks what the database
holds afterwards: a counter or state change that two processes race on happens exactly once.

Row-level changes are counted by a trigger the test installs in the server's database
(``change_log``): the server does not know about it, so the count is what really happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.device_agent.e2e_support import free_port
from tests.fleet_server.conftest import (
    TEST_PEPPER,
    _create_pg_database,
    _drop_pg_database,
    auth,
    default_inventory,
    enroll_device,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RACERS = 12

PG_TRIGGER = """
CREATE TABLE change_log (tbl text, row_id text, change text);
CREATE FUNCTION log_last_use() RETURNS trigger AS $$ BEGIN
  INSERT INTO change_log VALUES ('api_keys', NEW.id::text, 'last_used_at'); RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE FUNCTION log_token_use() RETURNS trigger AS $$ BEGIN
  INSERT INTO change_log VALUES ('enrollment_tokens', NEW.id::text, 'uses'); RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER api_keys_log AFTER UPDATE ON api_keys FOR EACH ROW
  WHEN (NEW.last_used_at IS DISTINCT FROM OLD.last_used_at) EXECUTE FUNCTION log_last_use();
CREATE TRIGGER tokens_log AFTER UPDATE ON enrollment_tokens FOR EACH ROW
  WHEN (NEW.uses <> OLD.uses) EXECUTE FUNCTION log_token_use();
"""
SQLITE_TRIGGER = [
    "CREATE TABLE change_log (tbl text, row_id text, change text)",
    "CREATE TRIGGER api_keys_log AFTER UPDATE OF last_used_at ON api_keys FOR EACH ROW"
    " WHEN NEW.last_used_at IS NOT OLD.last_used_at"
    " BEGIN INSERT INTO change_log VALUES ('api_keys', NEW.id, 'last_used_at'); END",
    "CREATE TRIGGER tokens_log AFTER UPDATE OF uses ON enrollment_tokens FOR EACH ROW WHEN NEW.uses <> OLD.uses"
    " BEGIN INSERT INTO change_log VALUES ('enrollment_tokens', NEW.id, 'uses'); END",
]


@dataclass
class TwoWorkerServer:
    url: str
    admin: dict[str, str]
    engine: sa.Engine
    process: subprocess.Popen[bytes]

    def changes(self, table: str) -> int:
        with self.engine.connect() as connection:
            query = sa.text("SELECT count(*) FROM change_log WHERE tbl = :t")
            return int(connection.execute(query, {"t": table}).scalar_one())

    def audit_count(self, action: str, target_id: str) -> int:
        with self.engine.connect() as connection:
            query = sa.text("SELECT count(*) FROM audit_log WHERE action = :a AND target_id = :t")
            return int(connection.execute(query, {"a": action, "t": target_id}).scalar_one())


def _worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes (spawned children; multiprocessing's resource tracker is not one)."""
    children = Path(f"/proc/{parent}/task/{parent}/children")
    pids = [int(pid) for pid in children.read_text().split()] if children.exists() else []
    return [pid for pid in pids if b"spawn_main" in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _start(data_dir: Path, database_url: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "EDGEFLEET_DATA_DIR": str(data_dir),
           "EDGEFLEET_DATABASE_URL": database_url, "EDGEFLEET_MODE": "dev", "EDGEFLEET_TOKEN_PEPPER": TEST_PEPPER,
           "EDGEFLEET_PUBLIC_URL": f"http://127.0.0.1:{port}", "EDGEFLEET_BACKGROUND_TASKS": "false",
           "EDGEFLEET_REQUIRE_APPROVAL": "true", "EDGEFLEET_LOG_LEVEL": "warning",
           "EDGEFLEET_ENROLL_RATE_PER_MINUTE": "1000"}  # fmt: skip
    command = [sys.executable, "-m", "fleet_server.cli", "run", "--port", str(port), "--workers", "2"]
    with open(data_dir.parent / "server.log", "wb") as log:  # a file: a full pipe would block the workers
        return subprocess.Popen(command, env=env, cwd=REPO_ROOT, start_new_session=True, stdout=log, stderr=log)


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200 and len(_worker_pids(process.pid)) >= 2:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the two-worker server did not start within 60 s")


def _admin_key(engine: sa.Engine) -> str:
    from fleet_server.db import make_session_factory, session_scope
    from fleet_server.services.api_keys import create_api_key

    with session_scope(make_session_factory(engine)) as session:
        _, secret = create_api_key(session, name="races", role="admin", actor="test", pepper=TEST_PEPPER)
    return secret


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoWorkerServer]:
    from bundles.tuf.keys import generate_key
    from fleet_server.db import make_engine, upgrade_database

    work = tmp_path_factory.mktemp(f"races-{request.param}")
    pg_name = None
    if request.param == "postgresql":
        pg_name, database_url = _create_pg_database()
    else:
        database_url = f"sqlite:///{work / 'fleet.db'}"
    upgrade_database(database_url)
    engine = make_engine(database_url)
    with engine.begin() as connection:
        if request.param == "postgresql":
            connection.exec_driver_sql(PG_TRIGGER)
        else:
            for statement in SQLITE_TRIGGER:
                connection.exec_driver_sql(statement)
    admin = auth(_admin_key(engine))
    for name in ("snapshot.pem", "timestamp.pem"):
        generate_key(work / "data" / "keys" / name)
    port = free_port()
    process = _start(work / "data", database_url, port)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, process)
        yield TwoWorkerServer(url, admin, engine, process)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        engine.dispose()
        if pg_name is not None:
            _drop_pg_database(pg_name)


def race(count: int, action: Callable[[httpx.Client], httpx.Response]) -> list[httpx.Response]:
    """Run ``action`` ``count`` times at once, each on its own connection; returns the answers."""
    barrier = threading.Barrier(count)
    answers: list[httpx.Response | BaseException] = [RuntimeError("not run")] * count

    def one(index: int, client: httpx.Client) -> None:
        try:
            client.get("/healthz").raise_for_status()  # the connection is open before the race starts
            barrier.wait(timeout=30)
            answers[index] = action(client)
        except BaseException as e:  # reported below
            answers[index] = e

    clients = [httpx.Client(base_url=URL.value, timeout=60) for _ in range(count)]
    threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    for client in clients:
        client.close()
    failures = [a for a in answers if not isinstance(a, httpx.Response)]
    assert not failures, failures
    return [a for a in answers if isinstance(a, httpx.Response)]


class URL:
    value = ""


@pytest.fixture(autouse=True)
def _base_url(server: TwoWorkerServer) -> None:
    URL.value = server.url


def _enroll_token(server: TwoWorkerServer, max_uses: int) -> dict[str, Any]:
    body = {"fleet": "lab", "expires_in_s": 3600, "max_uses": max_uses}
    answer = httpx.post(f"{server.url}/api/v1/admin/enroll-tokens", headers=server.admin, json=body)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def _token_uses(server: TwoWorkerServer, token_id: int) -> int:
    listed = httpx.get(f"{server.url}/api/v1/admin/enroll-tokens", headers=server.admin).json()
    return int(next(t["uses"] for t in listed if t["id"] == token_id))


def test_two_worker_processes_serve_the_races(server: TwoWorkerServer) -> None:
    assert len(_worker_pids(server.process.pid)) == 2


@pytest.mark.parametrize("max_uses", [1, 3])
def test_a_token_with_max_uses_enrolls_exactly_that_many_of_twelve_simultaneous_devices(
    server: TwoWorkerServer, max_uses: int
) -> None:
    token = _enroll_token(server, max_uses)
    answers = race(RACERS, lambda http: enroll_device(http, token["token"], default_inventory()))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * max_uses + [401] * (RACERS - max_uses), [a.text for a in answers]
    assert _token_uses(server, token["id"]) == max_uses
    assert server.changes("enrollment_tokens") >= max_uses  # the trigger saw each use (the table accumulates)
    refused = [a.json()["detail"] for a in answers if a.status_code == 401]
    assert all("enrollment token" in detail for detail in refused), refused


def test_a_reused_enrollment_nonce_enrolls_one_device(server: TwoWorkerServer) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    token = _enroll_token(server, RACERS)
    nonce = httpx.post(f"{server.url}/api/v1/enroll/challenge", json={}).json()["nonce"]

    def enroll_with_the_same_nonce(http: httpx.Client) -> httpx.Response:
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        body = {"token": token["token"], "public_key": public, "nonce": nonce,
                "signature": key.sign(bytes.fromhex(nonce)).hex(), "inventory": default_inventory()}  # fmt: skip
        return http.post("/api/v1/enroll", json=body)

    codes = sorted(a.status_code for a in race(RACERS, enroll_with_the_same_nonce))
    assert codes == [200] + [401] * (RACERS - 1)
    assert _token_uses(server, token["id"]) == 1


@pytest.mark.parametrize("round_", range(4))  # a lost race is a matter of microseconds: several fresh keys
def test_api_key_last_use_is_written_once_by_simultaneous_requests(server: TwoWorkerServer, round_: int) -> None:
    name = f"fresh-{round_}"
    created = httpx.post(f"{server.url}/api/v1/admin/api-keys", headers=server.admin,
                         json={"name": name, "role": "viewer"})  # fmt: skip
    assert created.status_code == 201, created.text
    before = server.changes("api_keys")
    headers = auth(created.json()["secret"])
    answers = race(RACERS, lambda http: http.get("/api/v1/admin/devices", headers=headers))
    assert {a.status_code for a in answers} == {200}
    assert server.changes("api_keys") - before == 1
    listed = httpx.get(f"{server.url}/api/v1/admin/api-keys", headers=server.admin).json()
    assert next(k for k in listed if k["name"] == name)["last_used_at"] is not None


def test_simultaneous_approvals_move_a_pending_device_once(server: TwoWorkerServer) -> None:
    token = _enroll_token(server, 1)
    enrolled = enroll_device(httpx.Client(base_url=server.url), token["token"], default_inventory())
    device_id = enrolled.json()["device_id"]
    assert enrolled.json()["status"] == "pending"
    answers = race(RACERS, lambda http: http.post(f"/api/v1/admin/devices/{device_id}/approve", headers=server.admin))
    assert {a.status_code for a in answers} == {200}
    assert {a.json()["status"] for a in answers} == {"accepted"}
    assert server.audit_count("device.approve", device_id) == 1


def test_approve_and_decommission_racing_move_the_device_once_each(server: TwoWorkerServer) -> None:
    token = _enroll_token(server, 1)
    enrolled = enroll_device(httpx.Client(base_url=server.url), token["token"], default_inventory())
    device_id = enrolled.json()["device_id"]
    actions = ["decommission", "approve"] * (RACERS // 2)
    counter = iter(range(RACERS))
    lock = threading.Lock()

    def act(http: httpx.Client) -> httpx.Response:
        with lock:
            action = actions[next(counter)]
        return http.post(f"/api/v1/admin/devices/{device_id}/{action}", headers=server.admin)

    answers = race(RACERS, act)
    # decommission is allowed from either status and final; an approve after it is a 409
    assert {a.status_code for a in answers} <= {200, 409}
    final = httpx.get(f"{server.url}/api/v1/admin/devices/{device_id}", headers=server.admin).json()["status"]
    assert final == "decommissioned"
    assert server.audit_count("device.decommission", device_id) == 1
    assert server.audit_count("device.approve", device_id) <= 1


def test_simultaneous_pauses_of_a_rollout_record_one_transition(server: TwoWorkerServer, tmp_path: Path) -> None:
    rollout_id = _running_rollout(server, tmp_path)
    answers = race(RACERS, lambda http: http.post(f"/api/v1/admin/rollouts/{rollout_id}/pause", headers=server.admin))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] + [409] * (RACERS - 1), [a.text for a in answers]
    shown = httpx.get(f"{server.url}/api/v1/admin/rollouts/{rollout_id}", headers=server.admin).json()
    assert shown["state"] == "paused"
    assert [d["action"] for d in shown["decisions"]].count("pause") == 1


def test_simultaneous_rollbacks_of_a_rollout_roll_it_back_once(server: TwoWorkerServer, tmp_path: Path) -> None:
    rollout_id = _running_rollout(server, tmp_path)
    answers = race(RACERS, lambda http: http.post(f"/api/v1/admin/rollouts/{rollout_id}/rollback",
                                                   headers=server.admin))  # fmt: skip
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] + [409] * (RACERS - 1), [a.text for a in answers]
    shown = httpx.get(f"{server.url}/api/v1/admin/rollouts/{rollout_id}", headers=server.admin).json()
    assert shown["state"] == "rolled_back"
    assert [d["action"] for d in shown["decisions"]].count("rollback") == 1
    assert server.audit_count("rollout.rollback", str(rollout_id)) == 1


def _running_rollout(server: TwoWorkerServer, tmp_path: Path) -> int:
    """Publish tiny@1 (a real signed bundle), enroll and approve a device, start a rollout to it."""
    from bundles.tuf.keys import generate_key, key_from_dict
    from bundles.tuf.root import make_root
    from tests.fleet_server.conftest import Release

    http = httpx.Client(base_url=server.url, timeout=30)
    state = http.get("/api/v1/admin/tuf/state", headers=server.admin).json()
    if state["root"] is None:
        root_signer, targets_signer = generate_key(tmp_path / "root.pem"), generate_key(tmp_path / "targets.pem")
        online = state["online_keys"]
        root = make_root([root_signer], [targets_signer], key_from_dict(online["snapshot"]),
                         key_from_dict(online["timestamp"]))  # fmt: skip
        assert http.put("/api/v1/admin/tuf/root", headers=server.admin, content=root).status_code == 200
        Release(http, server.admin, tmp_path, root_signer, targets_signer).publish("tiny", 1)  # type: ignore[arg-type]
    token = _enroll_token(server, 1)
    device_id = enroll_device(http, token["token"], default_inventory()).json()["device_id"]
    http.post(f"/api/v1/admin/devices/{device_id}/approve", headers=server.admin).raise_for_status()
    body = {"bundle": "tiny@1", "targets": [f"device:{device_id}"], "waves": "100%"}
    created = http.post("/api/v1/admin/rollouts", headers=server.admin, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["state"] == "running"
    return int(created.json()["id"])

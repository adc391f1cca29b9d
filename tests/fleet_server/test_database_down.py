"""While the database is down, every route that needs it answers 503 with Retry-After (never a 500).

PostgreSQL really goes away: the server reaches it through a TCP relay that the test shuts (every
connection cut, new ones refused), after the server has warmed its connection pools. SQLite has no
server to lose; what a SQLite node meets is a database locked longer than the busy timeout (another
process holding the write lock), which must be the same 503.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import uuid

import pytest
import sqlalchemy
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fleet_server.app import create_app
from fleet_server.errors import NO_DATABASE, install_error_handlers

SKIPPED_PATHS = NO_DATABASE | {"/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"}


class Relay:
    """A TCP relay to 127.0.0.1:5432 that can be cut."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", 5432))
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone would not
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def operations(app) -> list[tuple[str, str]]:
    schema = app.openapi()
    return [(method.upper(), path) for path, ops in schema["paths"].items() for method in ops
            if path not in SKIPPED_PATHS]  # fmt: skip


def concrete(path: str) -> str:
    return path.replace("{rollout_id}", "1").replace("{key_id}", "1").replace("{token_id}", "1").replace(
        "{version}", "1").replace("{action}", "pause").replace("{", "").replace("}", "")  # fmt: skip


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_every_route_answers_503_with_retry_after_while_postgresql_is_down(settings, make_device, make_api_key):
    device, key = make_device(), make_api_key("admin")
    relay = Relay()
    proxied = settings.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    app = create_app(settings.model_copy(update={"database_url": proxied}))
    with TestClient(app) as client:
        warm = client.get("/api/v1/device/desired-state", headers=device.headers)
        assert warm.status_code == 200 and client.get("/readyz").status_code == 200
        relay.cut()
        answers = {}
        for method, path in operations(app):
            headers = device.headers if path.startswith("/api/v1/device") else {"Authorization": f"Bearer {key}"}
            body = {"token": "t", "public_key": "a" * 64, "nonce": "ab", "signature": "b" * 128, "inventory": {}}
            response = client.request(method, concrete(path), headers=headers, json=body)
            answers[(method, path)] = (response.status_code, response.headers.get("retry-after"))
    wrong = {op: answer for op, answer in answers.items() if answer != (503, "5")}
    assert wrong == {}, wrong
    assert len(answers) >= 55


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_sqlite_database_locked_past_the_busy_timeout_is_a_503(settings, make_device, admin_headers):
    device = make_device()
    app = create_app(settings.model_copy(update={"sqlite_busy_timeout_ms": 200}))
    holder = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
    with TestClient(app) as client:
        holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        try:
            batch = {"batch_id": uuid.uuid4().hex, "events": [{"id": "e", "type": "error",
                                                               "at": "2026-11-29T12:00:00+00:00"}]}  # fmt: skip
            answers = [client.post("/api/v1/device/telemetry", json=batch, headers=device.headers),
                       client.post("/api/v1/admin/groups", json={"name": "g"}, headers=admin_headers)]  # fmt: skip
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert [(a.status_code, a.headers.get("retry-after")) for a in answers] == [(503, "5"), (503, "5")]
    assert all(a.json()["detail"] == "the database is unavailable; retry later" for a in answers)


def test_a_request_that_finds_every_pooled_connection_taken_past_the_pool_timeout_is_a_503(tmp_path):
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'pool.db'}", pool_size=1, max_overflow=0,
                                      pool_timeout=0.1)  # fmt: skip
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/needs-the-database")
    def needs_the_database() -> dict[str, int]:
        with engine.connect() as connection:
            return {"one": connection.exec_driver_sql("SELECT 1").scalar_one()}

    held = engine.connect()  # the only connection of the pool, kept
    try:
        answer = TestClient(app).get("/needs-the-database")
    finally:
        held.close()
        engine.dispose()
    assert (answer.status_code, answer.headers.get("retry-after")) == (503, "5")
    assert answer.json() == {"detail": "the database is unavailable; retry later"}

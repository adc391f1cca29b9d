"""Shared fixtures of the fleet-server tests (also used by tests/fleet_server/telemetry and rollouts).

Stable fixture names (other helpers' tests import them; do not rename):

- ``database_url`` (session, parametrised ``sqlite`` / ``postgresql``): a migrated database (``alembic
  upgrade head``) that lives for the whole test session. PostgreSQL gets its own uniquely named
  database ``edgefleet_fleetserver_<uuid8>`` on 127.0.0.1:5432 (created, then dropped at the end);
  SQLite is a file in a temporary directory. Every test that uses it runs once per database.
- ``db_engine`` (function): a SQLAlchemy engine on ``database_url`` whose tables were emptied before the
  test (every table but ``alembic_version``), so each test starts from a clean schema.
- ``settings`` (function): production-mode :class:`Settings` (secure values, data dir in ``tmp_path``,
  background tasks off) on that database.
- ``app`` (function): ``create_app(settings)``; ``client`` (function): a ``TestClient`` over it.
- ``session_factory`` (function): sessions on the app's engine, for arranging data directly.
- ``make_api_key(role="admin") -> str`` and ``admin_headers`` / ``operator_headers`` / ``viewer_headers``
  (dicts with ``Authorization``).
- ``make_enroll_token(fleet="lab", expires_in_s=3600, max_uses=None) -> str``.
- ``make_device(fleet="lab", inventory=None, hw_class="pi4") -> EnrolledDevice``: enrolls a device
  through the real API with a fresh Ed25519 key (``.device_id``, ``.access_token``, ``.headers``,
  ``.private_key``); it is ``accepted`` unless ``settings.require_approval`` is set.
- ``live_server`` (function): the same app served by uvicorn on 127.0.0.1 (port 0), yields the base URL.
- ``online_keys`` (function): the server's snapshot and timestamp keys created in the data dir.
- ``release`` (function): a release workstation (:class:`Release`): offline root and targets keys in
  ``tmp_path``, the server's root installed through ``PUT /api/v1/admin/tuf/root``;
  ``release.publication(name, version)`` builds a real tiny ONNX bundle (``bundles.testing``) and its
  signed publication, ``release.publish(name, version)`` also uploads it (201) and returns the answer.

Helpers: ``default_inventory(hw_class)``, ``auth(token)`` (an ``Authorization`` header dict),
``png_image(width, height)`` (the bytes of a real, decodable PNG of one colour),
``enroll_device(http, token, inventory, key=None)`` (the enrollment handshake with any client: a
``TestClient`` or an ``httpx.Client`` on ``live_server``), ``serve_on_loopback(app, port=0)`` (a context
manager: any app on uvicorn, yields its URL), ``empty_all_tables(engine)``, and the
dataclasses ``EnrolledDevice`` and ``Release``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.app import create_app
from fleet_server.db import make_engine, session_scope, upgrade_database
from fleet_server.services.api_keys import create_api_key
from fleet_server.services.enroll_tokens import create_enroll_token
from fleet_server.settings import Settings

PG_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TEST_PEPPER = "test-pepper-0123456789abcdef"


def auth(token: str) -> dict[str, str]:
    """An ``Authorization: Bearer`` header dict."""
    return {"Authorization": f"Bearer {token}"}


def png_image(width: int = 40, height: int = 20, rgb: tuple[int, int, int] = (31, 95, 191)) -> bytes:
    """A real PNG (8-bit RGB, one colour) a browser can decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def default_inventory(hw_class: str = "pi4") -> dict[str, Any]:
    """A plausible inventory of an aarch64 board with ONNX Runtime 1.20."""
    return {
        "hw_class": hw_class,
        "agent_version": "0.1.0",
        "capabilities": {"arch": "aarch64", "os": "linux", "python": "3.11.2", "runtimes": {"onnxruntime": "1.20.1"},
                         "accelerators": ["cpu"], "memory_mb": 3800, "disk_free_mb": 20000, "preferences": []},
        "installed": [],
    }  # fmt: skip


# --- databases -------------------------------------------------------------------------------------


def _create_pg_database() -> tuple[str, str]:
    name = f"edgefleet_fleetserver_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _drop_pg_database(name: str) -> None:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database for the whole session, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'fleet.db'}"
        upgrade_database(url)
        yield url
        return
    name, url = _create_pg_database()
    try:
        upgrade_database(url)
        yield url
    finally:
        _drop_pg_database(name)


_DELETE_ORDER: dict[str, list[str]] = {}


def empty_all_tables(engine: sa.Engine) -> None:
    """Delete every row of every table except ``alembic_version`` (the schema stays).

    ``DELETE`` children before parents (order reflected once per database): on tiny tables this is
    far cheaper than PostgreSQL's ``TRUNCATE``.
    """
    url = str(engine.url)
    if url not in _DELETE_ORDER:
        metadata = sa.MetaData()
        metadata.reflect(engine)
        _DELETE_ORDER[url] = [t.name for t in reversed(metadata.sorted_tables) if t.name != "alembic_version"]
    with engine.begin() as connection:
        for name in _DELETE_ORDER[url]:
            connection.execute(sa.text(f'DELETE FROM "{name}"'))


@pytest.fixture
def db_engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine on the session database, emptied before the test."""
    engine = make_engine(database_url)
    empty_all_tables(engine)
    yield engine
    engine.dispose()


# --- app -------------------------------------------------------------------------------------------


@pytest.fixture
def settings(db_engine: sa.Engine, database_url: str, tmp_path: Path) -> Settings:
    """Production-mode settings with secure values, on the test database."""
    return Settings(
        mode="production", data_dir=tmp_path / "data", database_url=database_url, public_url="https://fleet.test",
        token_pepper=TEST_PEPPER, background_tasks=False, json_logs=False, log_level="warning",
    )  # fmt: skip


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    """The app under test."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """An in-process HTTP client (lifespan run)."""
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def session_factory(app: FastAPI) -> sessionmaker[Session]:
    """Sessions on the app's database, for arranging data directly."""
    factory: sessionmaker[Session] = app.state.session_factory
    return factory


@pytest.fixture
def online_keys(app: FastAPI) -> None:
    """The server's online snapshot and timestamp keys, as ``edgefleet-server init`` makes them."""
    app.state.tuf.create_online_keys()


# --- factories -------------------------------------------------------------------------------------


@pytest.fixture
def make_api_key(session_factory: sessionmaker[Session], settings: Settings) -> Callable[..., str]:
    """Create an API key with a role; returns its secret."""

    def make(role: str = "admin", name: str | None = None) -> str:
        with session_scope(session_factory) as session:
            _, secret = create_api_key(session, name=name or f"test-{role}", role=role, actor="test",
                                       pepper=settings.token_pepper)  # fmt: skip
        return secret

    return make


@pytest.fixture
def admin_headers(make_api_key: Callable[..., str]) -> dict[str, str]:
    return auth(make_api_key("admin"))


@pytest.fixture
def operator_headers(make_api_key: Callable[..., str]) -> dict[str, str]:
    return auth(make_api_key("operator"))


@pytest.fixture
def viewer_headers(make_api_key: Callable[..., str]) -> dict[str, str]:
    return auth(make_api_key("viewer"))


@pytest.fixture
def make_enroll_token(session_factory: sessionmaker[Session], settings: Settings) -> Callable[..., str]:
    """Create a fleet enrollment token; returns its secret."""

    def make(fleet: str = "lab", expires_in_s: int = 3600, max_uses: int | None = None) -> str:
        with session_scope(session_factory) as session:
            _, secret = create_enroll_token(session, fleet=fleet, expires_in_s=expires_in_s, max_uses=max_uses,
                                            actor="test", pepper=settings.token_pepper)  # fmt: skip
        return secret

    return make


@dataclass
class EnrolledDevice:
    """A device enrolled through the real API."""

    device_id: str
    access_token: str
    private_key: Ed25519PrivateKey
    status: str
    enrollment: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return auth(self.access_token)


def enroll_device(http: Any, token: str, inventory: dict[str, Any], key: Ed25519PrivateKey | None = None) -> Any:
    """Run the enrollment handshake with ``http`` (a TestClient or httpx client); returns the response."""
    key = key or Ed25519PrivateKey.generate()
    nonce = http.post("/api/v1/enroll/challenge", json={}).json()["nonce"]
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    body = {"token": token, "public_key": public.hex(), "nonce": nonce,
            "signature": key.sign(bytes.fromhex(nonce)).hex(), "inventory": inventory}  # fmt: skip
    return http.post("/api/v1/enroll", json=body)


@pytest.fixture
def make_device(client: TestClient, make_enroll_token: Callable[..., str]) -> Callable[..., EnrolledDevice]:
    """Enroll a new device with a real Ed25519 key through the API."""

    def make(fleet: str = "lab", inventory: dict[str, Any] | None = None, hw_class: str = "pi4") -> EnrolledDevice:
        key = Ed25519PrivateKey.generate()
        response = enroll_device(client, make_enroll_token(fleet), inventory or default_inventory(hw_class), key)
        assert response.status_code == 200, response.text
        body = response.json()
        return EnrolledDevice(body["device_id"], body["access_token"], key, body["status"], body)

    return make


# --- a release workstation ------------------------------------------------------------------------


@dataclass
class Release:
    """Offline release keys and helpers that publish bundles to the server under test."""

    client: TestClient
    headers: dict[str, str]
    work_dir: Path
    root_signer: Any
    targets_signer: Any

    def root_bytes(self) -> bytes:
        return self.client.get("/tuf/metadata/root.json").content

    def current_targets_bytes(self) -> bytes | None:
        state = self.client.get("/api/v1/admin/tuf/state", headers=self.headers).json()
        if state["targets"] is None:
            return None
        version = state["targets"]["signed"]["version"]
        return self.client.get(f"/tuf/metadata/{version}.targets.json").content

    def bundle_files(self, name: str, version: int) -> dict[str, Path]:
        """Target path -> local file for a freshly built tiny ONNX bundle."""
        from bundles.archive import pack_variant
        from bundles.testing import build_bundle_dir

        bundle_dir = self.work_dir / f"{name}-{version}"
        manifest = build_bundle_dir(bundle_dir, name=name, version=version)
        files = {f"{name}/{version}/manifest.json": bundle_dir / "manifest.json"}
        for variant in manifest.variants:
            out = self.work_dir / f"{name}-{version}-{variant.id}.tgz"
            archive = pack_variant(bundle_dir, manifest, variant.id, out)
            files[f"{name}/{version}/{variant.id}.tar.gz"] = archive
        return files

    def publication(self, name: str = "tiny", version: int = 1, files: dict[str, Path] | None = None) -> Path:
        """A signed publication (targets version N+1) adding the bundle's targets."""
        from bundles.tuf.publication import make_publication

        out = self.work_dir / f"publication-{name}-{version}-{uuid.uuid4().hex[:6]}.tar.gz"
        files = files or self.bundle_files(name, version)
        return make_publication(self.current_targets_bytes(), self.root_bytes(), files, self.targets_signer, out)

    def publish(self, name: str = "tiny", version: int = 1) -> dict[str, Any]:
        """Publish a bundle through the admin API; returns the 201 answer."""
        response = self.client.post("/api/v1/admin/publications", headers=self.headers,
                                    content=self.publication(name, version).read_bytes())  # fmt: skip
        assert response.status_code == 201, response.text
        answer: dict[str, Any] = response.json()
        return answer


@pytest.fixture
def release(client: TestClient, admin_headers: dict[str, str], online_keys: None, tmp_path: Path) -> Release:
    """A release workstation whose root (with the server's online keys) is installed on the server."""
    from bundles.tuf.keys import generate_key, key_from_dict
    from bundles.tuf.root import make_root

    work = tmp_path / "release"
    work.mkdir()
    root_signer, targets_signer = generate_key(work / "root.pem"), generate_key(work / "targets.pem")
    online = client.get("/api/v1/admin/tuf/state", headers=admin_headers).json()["online_keys"]
    root = make_root([root_signer], [targets_signer], key_from_dict(online["snapshot"]),
                     key_from_dict(online["timestamp"]))  # fmt: skip
    response = client.put("/api/v1/admin/tuf/root", headers=admin_headers, content=root)
    assert response.status_code == 200, response.text
    return Release(client, admin_headers, work, root_signer, targets_signer)


# --- a real server on loopback ---------------------------------------------------------------------


@contextlib.contextmanager
def serve_on_loopback(app: FastAPI, port: int = 0) -> Iterator[str]:
    """``app`` on uvicorn on 127.0.0.1 (an ephemeral port unless given; lifespan on); yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port given again after a stop
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    assert server.started, "uvicorn did not start within 10 s"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (an ephemeral port); yields ``http://127.0.0.1:<port>``."""
    with serve_on_loopback(app) as url:
        yield url

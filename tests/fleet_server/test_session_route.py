"""A synchronous handler's ``SessionDep`` transaction ends in the handler's own thread (``deps.SessionRoute``).

FastAPI validates a synchronous handler's response on another thread of its shared pool and only then
runs the session dependency's exit. A SQLite transaction that wrote holds the write lock until it
commits; left to the exit, it waited for a pool thread while every pool thread waited for its lock
(``tests/fleet_server/test_sqlite_write_burst.py`` shows the collapse on a real server). Here a
response model looks, from another connection, at what is committed when the response is validated.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, field_validator
from sqlalchemy import Engine, text

from fleet_server.api.deps import SessionDep, SessionRoute, get_session
from fleet_server.db import make_engine, make_session_factory

ENGINE: list[Engine] = []  # the database of the test that runs (the response model reads it)


class Seen(BaseModel):
    """A response whose validation counts the notes another connection sees (committed ones only, WAL)."""

    committed_notes: int = -1

    @field_validator("committed_notes", mode="before")
    @classmethod
    def count_committed(cls, _value: object) -> int:
        with ENGINE[-1].connect() as connection:
            return int(connection.exec_driver_sql("SELECT count(*) FROM notes").scalar_one())


def add_note(session: SessionDep) -> dict[str, int]:
    session.execute(text("INSERT INTO notes VALUES ('written by the handler')"))
    return {"committed_notes": 0}


def notes_app(route_class: type[APIRoute], engine: Engine) -> FastAPI:
    router = APIRouter(route_class=route_class)
    router.add_api_route("/notes", add_note, methods=["POST"], response_model=Seen)
    app = FastAPI()
    app.state.session_factory = make_session_factory(engine)
    app.include_router(router)
    return app


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'notes.db'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE notes (text TEXT)")
    ENGINE.append(engine)
    yield engine
    ENGINE.remove(engine)
    engine.dispose()


def test_a_session_route_commits_before_the_response_is_validated(engine: Engine) -> None:
    with TestClient(notes_app(SessionRoute, engine)) as client:
        answer = client.post("/notes")
    assert answer.status_code == 200 and answer.json() == {"committed_notes": 1}


def test_a_plain_route_validates_the_response_before_the_commit(engine: Engine) -> None:
    """Why ``SessionRoute`` exists: without it the write is still uncommitted (and locks SQLite) at validation."""
    with TestClient(notes_app(APIRoute, engine)) as client:
        answer = client.post("/notes")
    assert answer.status_code == 200 and answer.json() == {"committed_notes": 0}
    with engine.connect() as connection:  # committed afterwards, by the dependency's exit
        assert connection.exec_driver_sql("SELECT count(*) FROM notes").scalar_one() == 1


def test_a_handler_that_raises_is_rolled_back(engine: Engine) -> None:
    def failing(session: SessionDep) -> dict[str, int]:
        session.execute(text("INSERT INTO notes VALUES ('never kept')"))
        raise RuntimeError("the handler failed after writing")

    router = APIRouter(route_class=SessionRoute)
    router.add_api_route("/fail", failing, methods=["POST"])
    app = FastAPI()
    app.state.session_factory = make_session_factory(engine)
    app.include_router(router)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/fail").status_code == 500
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM notes").scalar_one() == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_synchronous_route_with_a_session_commits_before_returning(app: FastAPI) -> None:
    with_session = [r for r in api_routes(app.routes) if any(d.call is get_session for d in r.dependant.dependencies)]
    synchronous = [r for r in with_session if not inspect.iscoroutinefunction(r.endpoint)]
    assert len(synchronous) >= 20  # the admin, telemetry, rollout and device routes
    unwrapped = [r.path for r in synchronous if not getattr(r.dependant.call, "commits_before_returning", False)]
    assert unwrapped == []


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every ``APIRoute`` of an app, through the routers it includes (FastAPI keeps those as they were built)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)

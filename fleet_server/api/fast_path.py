"""The desired-state poll answered before FastAPI's router: the hot path of a fleet.

Every device polls ``GET /api/v1/device/desired-state`` every few minutes, and almost every answer is
a 304. Routing through FastAPI (route matching over every route, dependency solving, response
validation) costs more CPU than the poll itself, so this small ASGI middleware answers those
requests directly with the same service and the same ETag rules as the documented route in
:mod:`fleet_server.api.device` (which stays, for the OpenAPI schema and for requests the fast path
declines, e.g. an over-long header, which then get the route's 422).
"""

from __future__ import annotations

import json
import logging
import sqlite3

import psycopg
from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp, Receive, Scope, Send

from bundles.errors import AuthError, EdgeFleetError
from fleet_server.errors import RETRY_AFTER_S, UNAVAILABLE, status_for
from fleet_server.observability import Metrics
from fleet_server.services.desired_state import DesiredStateService, etag_matches

log = logging.getLogger("fleet_server.api.fast_path")
PATH = "/api/v1/device/desired-state"
DATABASE_ERRORS = (OperationalError, psycopg.OperationalError, sqlite3.OperationalError, OSError)
MAX_HEADER_BYTES = 1000


class DesiredStateFastPath:
    """Answers well-formed desired-state polls; passes everything else on unchanged."""

    def __init__(self, app: ASGIApp, service: DesiredStateService, metrics: Metrics) -> None:
        self.app = app
        self.service = service
        self.not_modified_polls = metrics.polls.labels("not_modified")
        self.changed_polls = metrics.polls.labels("changed")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"")
        if_none_match = headers.get(b"if-none-match", b"")
        if len(authorization) > MAX_HEADER_BYTES or len(if_none_match) > MAX_HEADER_BYTES:
            await self.app(scope, receive, send)
            return
        scope["edgefleet.route"] = PATH
        status, response_headers, body = await self.answer(
            authorization.decode("latin-1"), if_none_match.decode("latin-1")
        )
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})

    async def answer(self, authorization: str, if_none_match: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and body for one poll (errors as the JSON ``detail`` the rest of the API uses)."""
        scheme, _, token = authorization.partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise_missing_token()
            state = await self.service.for_token(token.strip())
        except EdgeFleetError as error:
            return _error(status_for(error), str(error))
        except DATABASE_ERRORS as error:  # down or locked: the device retries later, as every route says
            log.error("database unavailable for a desired-state poll: %s", error)
            return _error(503, UNAVAILABLE, ((b"retry-after", RETRY_AFTER_S.encode()),))
        headers = [(b"etag", state.etag.encode()), (b"cache-control", b"no-cache")]
        if etag_matches(if_none_match, state.etag):
            self.not_modified_polls.inc()
            return 304, headers, b""
        self.changed_polls.inc()
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(state.body)).encode())]
        return 200, headers, state.body


def raise_missing_token() -> None:
    """The same 401 as the documented route."""
    raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")


def _error(
    status: int, detail: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return status, headers, body

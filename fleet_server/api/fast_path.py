"""The desired-state poll (and telemetry uploads) answered before FastAPI's router: the hot paths of a fleet.

Every device polls ``GET /api/v1/device/desired-state`` every few minutes, and almost every answer is
a 304. Routing through FastAPI (route matching over every route, dependency solving, response
validation) costs more CPU than the poll itself, so this small ASGI middleware answers those
requests directly with the same service and the same ETag rules as the documented route in
:mod:`fleet_server.api.device` (which stays, for the OpenAPI schema and for requests the fast path
declines, e.g. an over-long header, which then get the route's 422).
"""

from __future__ import annotations

import inspect
import json
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from bundles.errors import AuthError, EdgeFleetError
from fleet_server.api.device import store_upload, uploading_device
from fleet_server.errors import RETRY_AFTER_S, UNAVAILABLE, status_for
from fleet_server.observability import Metrics
from fleet_server.services.desired_state import DesiredStateService, etag_matches

log = logging.getLogger("fleet_server.api.fast_path")
PATH = "/api/v1/device/desired-state"
DATABASE_ERRORS = (OperationalError, PoolTimeoutError, psycopg.OperationalError, sqlite3.OperationalError, OSError)
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


UPLOAD_PATH = "/api/v1/device/telemetry"
MAX_ENCODING_BYTES = 50  # the route's ``Content-Encoding`` bound (longer: the route's 422)


class TelemetryFastPath:
    """Answers telemetry uploads before FastAPI's router, with the route's own code (``device.store_upload``).

    It sits behind the request guard (rate limits and body limits apply as to every route); the
    route's errors are answered by the app's own exception handlers, so statuses and bodies are the
    route's. Requests with a repeated or over-long ``Authorization`` or ``Content-Encoding`` header go
    on to the route.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != UPLOAD_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        authorizations = [value for name, value in scope["headers"] if name == b"authorization"]
        encodings = [value for name, value in scope["headers"] if name == b"content-encoding"]
        if len(authorizations) > 1 or len(encodings) > 1 or any(len(v) > MAX_HEADER_BYTES for v in authorizations):
            await self.app(scope, receive, send)
            return
        if encodings and len(encodings[0]) > MAX_ENCODING_BYTES:
            await self.app(scope, receive, send)
            return
        scope["edgefleet.route"] = UPLOAD_PATH
        request = Request(scope, receive)
        try:
            device = await uploading_device(request)
            body = await store_upload(request, device, encodings[0].decode("latin-1") if encodings else None)
        except Exception as error:
            handler = _exception_handler(scope["app"], error)
            if handler is None:
                raise
            response = handler(request, error)
            if inspect.isawaitable(response):
                response = await response
            await response(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _exception_handler(app: Any, error: Exception) -> Callable[..., Any] | None:
    """The handler the app registered for ``error``'s class or its nearest base (as Starlette looks it up)."""
    handlers = app.exception_handlers
    for cls in type(error).__mro__:
        if cls in handlers:
            return handlers[cls]  # type: ignore[no-any-return]
    return None

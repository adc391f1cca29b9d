"""Domain errors -> HTTP, in one place.

Services raise errors from :mod:`bundles.errors` (or the few server-only ones below, which belong to
those families); :func:`install_error_handlers` maps each family to a status code and a JSON body
``{"detail": "<one readable sentence>"}``. Request validation errors become a 422 with the first
problem spelled out, so that no malformed input ever surfaces as a 500. A database that is down or
locked is a 503 with ``Retry-After`` on every route that needs it, whether the error comes through
SQLAlchemy or straight from the driver (``COPY``, the desired-state poll's raw connections).

:func:`document_errors` makes the published OpenAPI schema say the same: every operation lists the
error statuses the API answers, each with the :data:`ERROR_SCHEMA` body.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bundles.errors import (
    AuthError,
    BundleError,
    ConfigError,
    EdgeFleetError,
    KeyFileError,
    RollbackAttackError,
    ServerError,
    TransportError,
    VersionConflictError,
)

log = logging.getLogger("fleet_server.errors")


class NotFoundError(ConfigError):
    """The named resource does not exist (404)."""


class ConflictError(ConfigError):
    """The request conflicts with the current state, e.g. deleting a bundle in use (409)."""


class PayloadTooLargeError(ConfigError):
    """A request body is over its size limit (413)."""


class ForbiddenError(AuthError):
    """The caller is authenticated but its role or identity does not allow this (403)."""


class RateLimitedError(ServerError):
    """Too many requests of this kind; retry after a while (429)."""


# Most specific first: the first matching family decides the status.
STATUS_BY_ERROR: tuple[tuple[type[EdgeFleetError], int], ...] = (
    (NotFoundError, 404),
    (ConflictError, 409),
    (PayloadTooLargeError, 413),
    (ForbiddenError, 403),
    (RateLimitedError, 429),
    (AuthError, 401),
    (RollbackAttackError, 409),
    (VersionConflictError, 409),
    (BundleError, 400),
    (KeyFileError, 500),
    (ConfigError, 400),
    (TransportError, 503),
)


def status_for(error: EdgeFleetError) -> int:
    """The HTTP status of a domain error (500 only for errors that are the server's own fault)."""
    for family, status in STATUS_BY_ERROR:
        if isinstance(error, family):
            return status
    return 500


def _domain_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, EdgeFleetError)
    status = status_for(error)
    if status >= 500:
        log.error("server error: %s", error, exc_info=error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 429:
        headers = {"Retry-After": "60"}
    return error_response(str(error), status, headers)


def error_response(detail: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """The ``{"detail": ...}`` body every error has; text a client sent (lone surrogates included) is
    escaped so that the answer can always be encoded."""
    safe = detail.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(safe) > MAX_DETAIL_CHARS:  # a message quoting what the client sent stays readable
        safe = safe[: MAX_DETAIL_CHARS - 3] + "..."
    return JSONResponse({"detail": safe}, status_code=status, headers=headers)


def describe_validation_error(errors: list[Any]) -> str:
    """One readable sentence from pydantic's error list, naming where the first problem is."""
    if not errors:
        return "the request is invalid"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "request"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'is invalid')}{more}"


def _validation_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return error_response(describe_validation_error(list(error.errors())), 422)


def _http_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    return error_response(str(error.detail), error.status_code, dict(error.headers or {}))


RETRY_AFTER_S = "5"
MAX_DETAIL_CHARS = 1000
UNAVAILABLE = "the database is unavailable; retry later"


def unavailable() -> JSONResponse:
    """The 503 every route answers while the database is down."""
    return error_response(UNAVAILABLE, 503, {"Retry-After": RETRY_AFTER_S})


def _driver_error(_request: Request, error: Exception) -> JSONResponse:
    """A driver error that did not pass through SQLAlchemy (``COPY``, raw connections)."""
    if isinstance(error, (psycopg.OperationalError, sqlite3.OperationalError)):
        log.error("database unavailable: %s", error)
        return unavailable()
    if isinstance(error, psycopg.DataError):
        return error_response(f"a value does not fit the database column ({error})", 400)
    return _unexpected(_request, error)


def _database_error(_request: Request, error: Exception) -> JSONResponse:
    """Out-of-range input the validation missed is a 400; a unique row that a concurrent request created
    first is a 409; a database that is down, locked or out of pooled connections is a 503 (retry later);
    anything else is our bug, a 500."""
    if isinstance(error, DataError):
        return error_response(f"a value does not fit the database column ({error.orig})", 400)
    if isinstance(error, IntegrityError):  # a unique row two requests raced to create
        log.warning("integrity conflict: %s", error.orig)
        return error_response("a concurrent request changed the same record; retry", 409)
    if isinstance(error, (OperationalError, PoolTimeoutError)):  # down, locked, or every connection busy
        log.error("database unavailable: %s", error)
        return unavailable()
    return _unexpected(_request, error)


def _unexpected(_request: Request, error: Exception) -> JSONResponse:
    log.error("unhandled error: %s", error, exc_info=error)
    return JSONResponse({"detail": "internal server error (logged)"}, status_code=500)


ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error", "type": "object", "required": ["detail"],
    "properties": {"detail": {"type": "string", "maxLength": 1000, "description": "one readable sentence"}},
}  # fmt: skip
ERROR_STATUSES: dict[str, str] = {
    "400": "invalid input (the detail names the field)", "401": "missing, unknown or revoked credentials",
    "403": "credentials without the right role, or a device not accepted",
    "404": "not found", "409": "conflicts with the current state", "413": "body over this route's limit",
    "422": "malformed request (the detail names the field)", "429": "rate limited (see Retry-After)",
    "503": "the database is unavailable (see Retry-After)",
}  # fmt: skip
NO_DATABASE = frozenset({"/healthz", "/metrics", "/tuf/metadata/{filename}", "/tuf/targets/{path}"})


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare every error status, with :data:`ERROR_SCHEMA`, on every operation of an OpenAPI schema."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = ERROR_SCHEMA
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, meaning in ERROR_STATUSES.items():
                if status == "503" and path in NO_DATABASE:
                    continue
                described = responses.get(status, {}).get("description") or meaning
                responses[status] = {"description": described, "content": body}
    return schema


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping on an app (called once by ``create_app``)."""
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(psycopg.Error, _driver_error)
    app.add_exception_handler(sqlite3.Error, _driver_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(EdgeFleetError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

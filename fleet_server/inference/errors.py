"""The endpoint's errors as HTTP: ``{"error": "<one sentence>"}`` and a 4xx for anything the client got wrong.

Statuses: 400 bad input (shape, datatype, JSON, binary layout, a model that fails on the input),
401/403 credentials, 404 unknown model or version or path, 413 body over the limit, 415 unknown
``Content-Encoding``, 429 queue full or rate limited (``Retry-After``), 503 the model cannot be
served now (not loaded, failed its self-test or its verification, too big for the memory budget,
the database is down; ``Retry-After``), 504 the request's own deadline passed. A 500 is only what
nothing here foresaw (logged with its traceback).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bundles.errors import (
    BusyError,
    DeadlineExceededError,
    EdgeFleetError,
    InferenceError,
    InputError,
    InstallError,
    ModelNotReadyError,
    RequestTooLargeError,
    RuntimeUnavailableError,
    TrustError,
    UnsupportedEncodingError,
)
from fleet_server.errors import RateLimitedError, describe_validation_error, status_for

log = logging.getLogger("fleet_server.inference")

# Most specific first; what is not listed here takes the fleet server's own mapping.
STATUS_BY_ERROR: tuple[tuple[type[EdgeFleetError], int], ...] = (
    (RequestTooLargeError, 413),
    (UnsupportedEncodingError, 415),
    (InputError, 400),
    (DeadlineExceededError, 504),
    (RateLimitedError, 429),
    (ModelNotReadyError, 503),
    (RuntimeUnavailableError, 503),
    (BusyError, 429),
    (InferenceError, 400),
    (InstallError, 503),
    (TrustError, 503),
)
RETRY_AFTER_S = {429: 1, 503: 5}


def status_of(error: EdgeFleetError) -> int:
    """The HTTP status of a domain error raised while answering."""
    from fleet_server.inference.repository import NotEnoughMemoryError

    if isinstance(error, NotEnoughMemoryError):
        return 503
    for kind, status in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return status
    return status_for(error)


def error_response(message: str, status: int, request: Request | None = None, param: str | None = None) -> JSONResponse:
    """``{"error": message}``; on the OpenAI routes (``/v1/``) OpenAI's error object, which its clients read."""
    retry = RETRY_AFTER_S.get(status)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    if request is not None and request.url.path.startswith("/v1/"):
        return JSONResponse(openai_error(message[:2000], status, param), status_code=status, headers=headers)
    return JSONResponse({"error": message[:2000]}, status_code=status, headers=headers)


def openai_error(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _domain(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, EdgeFleetError)
    status = status_of(error)
    if status >= 500:
        log.warning("inference: %s: %s", type(error).__name__, error)
    return error_response(str(error), status, request, getattr(error, "param", None))


def _validation(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return error_response(describe_validation_error(list(error.errors())), 400, request)


def _http(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    return error_response(str(error.detail), error.status_code, request)


def _database(_request: Request, error: Exception) -> JSONResponse:
    log.warning("inference: database unavailable: %s", error)
    return error_response("the fleet database is unavailable; retry shortly", 503)


def _unexpected(_request: Request, error: Exception) -> JSONResponse:
    log.error("inference: unhandled error: %s", error, exc_info=error)
    return error_response("internal error (logged)", 500)


def install(app: FastAPI) -> None:
    """Register the mapping on the inference app."""
    handlers: list[tuple[Any, Any]] = [
        (Exception, _unexpected), (SQLAlchemyError, _database), (psycopg.Error, _database),
        (sqlite3.Error, _database), (EdgeFleetError, _domain), (RequestValidationError, _validation),
        (StarletteHTTPException, _http),
    ]  # fmt: skip
    for kind, handler in handlers:
        app.add_exception_handler(kind, handler)

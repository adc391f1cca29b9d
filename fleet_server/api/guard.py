"""Every request bounded before the app reads it: rate limits, body sizes per route, JSON shape.

A plain ASGI middleware in front of the router (behind the desired-state fast path, whose polls have
no body):

1. **Rate limits first**: enrollment (the only unauthenticated writes) is rate-limited per client
   address before a byte of its body is read (429 with ``Retry-After``).
2. **Body size while reading**: each route has a limit (:func:`body_limit`); a ``Content-Length``
   over it is refused at once (413), and a body without one is counted as it streams in and refused
   as soon as it passes the limit, so that no request can make the server buffer more than its route
   allows. Unauthenticated routes have the smallest limit (``max_unauthenticated_bytes``), JSON
   routes ``max_json_bytes``; telemetry and publications are streamed by their handlers under their
   own limits (``max_telemetry_bytes``, ``max_publication_bytes``) and only counted here.
3. **JSON shape before parsing into models**: a buffered JSON body is decoded strictly once
   (:mod:`fleet_server.services.json_guard`: no NaN or infinities, 64-bit integers, valid Unicode,
   bounded string lengths and nesting depth); a violation is a 400 naming the field. Which bodies are
   JSON is decided by FastAPI's own rule (:func:`_is_json`), and a repeated ``Content-Type`` is refused:
   otherwise a header the guard reads one way and FastAPI another (Starlette takes the first of two,
   ``email`` strips characters ``bytes.strip`` keeps) would let a body past the check into a handler.

Refusals are JSON ``{"detail": ...}`` bodies like every other error of the API.
"""

from __future__ import annotations

import email.message
import json
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bundles.errors import ConfigError
from fleet_server.errors import PayloadTooLargeError, RateLimitedError
from fleet_server.ratelimit import RateLimiter
from fleet_server.services.json_guard import loads
from fleet_server.settings import Settings

UNAUTHENTICATED = frozenset({("POST", "/api/v1/enroll"), ("POST", "/api/v1/enroll/challenge")})
"""The unauthenticated writes of the API: rate-limited per address here, and the smallest body limit."""
SMALL_BODIES = UNAUTHENTICATED | {("POST", "/ui/login")}
"""Routes anyone can post to without credentials (the dashboard's login form too): ``max_unauthenticated_bytes``."""
STREAMED = {("POST", "/api/v1/device/telemetry"): "max_telemetry_bytes",
            ("POST", "/api/v1/admin/publications"): "max_publication_bytes"}  # fmt: skip
BODILESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class Refusal:
    """An answer the guard gives instead of the app."""

    status: int
    detail: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def body_limit(settings: Settings, method: str, path: str) -> tuple[int, bool]:
    """The body limit of a route in bytes, and whether its handler streams the body itself."""
    if (method, path) in SMALL_BODIES:
        return settings.max_unauthenticated_bytes, False
    streamed = STREAMED.get((method, path))
    if streamed is not None:
        return int(getattr(settings, streamed)), True
    return settings.max_json_bytes, False


class RequestGuard:
    """The middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = dict(scope["headers"])
        try:
            if (method, path) in UNAUTHENTICATED:
                client = scope.get("client")
                limiter: RateLimiter = scope["app"].state.enroll_limiter
                limiter.check(client[0] if client else "unknown", "enrollment requests")
            limit, streamed = body_limit(self.settings, method, path)
            declared = _declared_length(headers, limit)
            if sum(1 for name, _ in scope["headers"] if name == b"content-type") > 1:
                raise ConfigError("Content-Type is given more than once")
        except (ConfigError, RateLimitedError) as error:
            await _refuse(send, _refusal(error))
            return
        if streamed:
            await self.app(scope, _counting(receive, limit), send)
            return
        if method in BODILESS_METHODS and declared is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        await self._buffered(scope, receive, send, headers, limit)

    async def _buffered(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], limit: int
    ) -> None:
        """Read the body (at most ``limit`` bytes), check it if it is JSON, then hand it on unchanged."""
        try:
            body, last = await _read_capped(receive, limit)
            if body and _is_json(headers.get(b"content-type")):
                loads(body, "body")
        except ConfigError as error:
            await _refuse(send, _refusal(error))
            return
        await self.app(scope, _replay(body, last, receive), send)


def _declared_length(headers: dict[bytes, bytes], limit: int) -> int | None:
    raw = headers.get(b"content-length")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise ConfigError("Content-Length is not a number of bytes")
    if int(raw) > limit:
        raise PayloadTooLargeError(f"the request body ({int(raw)} bytes) is over this route's limit of {limit} bytes")
    return int(raw)


async def _read_capped(receive: Receive, limit: int) -> tuple[bytes, Message]:
    """The whole body, refused (413) as soon as it passes ``limit``; also the last message received."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts), message
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request body is over this route's limit of {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts), message


def _replay(body: bytes, last: Message, receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body over once, then behaves like the original."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if last["type"] != "http.request":
                return last  # the client went away before the end of its body
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _counting(receive: Receive, limit: int) -> Receive:
    """A ``receive`` that raises a 413 (in the handler reading it) once more than ``limit`` bytes arrived."""
    size = 0

    async def counting() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise PayloadTooLargeError(f"the request body is over this route's limit of {limit} bytes")
        return message

    return counting


def _is_json(content_type: bytes | None) -> bool:
    """Whether FastAPI parses the body as JSON, by its own rule (``fastapi.routing``): when no or an empty
    content type is given, or when ``email.message`` reads it as ``application/json`` or ``application/*+json``."""
    if not content_type or content_type == b"application/json":
        return True
    message = email.message.Message()
    message["content-type"] = content_type.decode("latin-1")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _refusal(error: ConfigError | RateLimitedError) -> Refusal:
    if isinstance(error, RateLimitedError):
        return Refusal(429, str(error), ((b"retry-after", b"60"),))
    return Refusal(413 if isinstance(error, PayloadTooLargeError) else 400, str(error))


async def _refuse(send: Send, refusal: Refusal) -> None:
    body = json.dumps({"detail": refusal.detail}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close"), *refusal.headers]  # fmt: skip
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["RequestGuard", "body_limit"]

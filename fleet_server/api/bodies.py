"""Reading raw request bodies with a size cap, before anything is buffered past the limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request

from bundles.errors import ConfigError
from fleet_server.errors import PayloadTooLargeError


def declared_length(request: Request, max_bytes: int) -> int | None:
    """The Content-Length, refused early when it is over ``max_bytes`` or not a number."""
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise ConfigError("Content-Length is not a number")
    if int(raw) > max_bytes:
        raise PayloadTooLargeError(f"the request body ({raw} bytes) is over the limit of {max_bytes} bytes")
    return int(raw)


async def capped_chunks(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body's chunks, stopping with a 413 as soon as more than ``max_bytes`` arrived."""
    declared_length(request, max_bytes)
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLargeError(f"the request body is over the limit of {max_bytes} bytes")
        yield chunk


async def read_capped(request: Request, max_bytes: int) -> bytes:
    """The whole body in memory (for small bodies such as telemetry and root metadata)."""
    parts = [chunk async for chunk in capped_chunks(request, max_bytes)]
    return b"".join(parts)


async def spool_capped(request: Request, max_bytes: int, dest: Path) -> int:
    """Stream the body to ``dest`` (never held in memory); returns its size."""
    size = 0
    with dest.open("wb") as handle:
        async for chunk in capped_chunks(request, max_bytes):
            handle.write(chunk)
            size += len(chunk)
    return size

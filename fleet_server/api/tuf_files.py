"""The TUF repository over HTTP: ``/tuf/metadata/{file}`` and ``/tuf/targets/{path}``.

Caching: ``timestamp.json`` (and unversioned ``root.json``/``snapshot.json``) change in place, so they
are ``no-cache``; versioned metadata (``3.targets.json``) and hash-prefixed targets never change, so
they are ``immutable`` for a year. Targets answer ``Range`` with 206 so a device resumes an
interrupted download; an unsatisfiable range is a 416.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from fleet_server.errors import NotFoundError
from fleet_server.storage import Storage

router = APIRouter(prefix="/tuf", tags=["tuf"])

IMMUTABLE = "public, max-age=31536000, immutable"
NO_CACHE = "no-cache"
_METADATA_RE = re.compile(r"^(?:(\d{1,10})\.)?(root|targets|snapshot|timestamp)\.json$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_HASH_PREFIXED_RE = re.compile(r"(^|/)[0-9a-f]{64}\.[^/]+$")
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such file"}}


@router.get("/metadata/{filename}", responses=NOT_FOUND)
def metadata(filename: str, request: Request) -> Response:
    """A TUF metadata file."""
    match = _METADATA_RE.match(filename)
    if match is None:
        raise NotFoundError(f"no TUF metadata file {filename!r}")
    storage: Storage = request.app.state.tuf.storage
    body = storage.read_bytes(f"metadata/{filename}")
    versioned = match.group(1) is not None
    return Response(
        body, media_type="application/json", headers={"Cache-Control": IMMUTABLE if versioned else NO_CACHE}
    )


@router.get("/targets/{path:path}", responses={**NOT_FOUND, 206: {"description": "partial content"},
                                                416: {"description": "range not satisfiable"}})  # fmt: skip
def target(
    path: str, request: Request, range_header: str | None = Header(default=None, alias="range", max_length=200)
) -> Response:
    """A target file; ``Range: bytes=a-b`` answers 206 with just those bytes."""
    storage: Storage = request.app.state.tuf.storage
    key = f"targets/{path}"
    size = storage.size(key)
    cache = IMMUTABLE if _HASH_PREFIXED_RE.search(path) else NO_CACHE
    headers = {"Accept-Ranges": "bytes", "Cache-Control": cache}
    try:
        span = parse_range(range_header, size)
    except RangeNotSatisfiableError:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if span is None:
        return _stream(storage, key, 0, size - 1, 200, {**headers, "Content-Length": str(size)})
    start, end = span
    headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
    return _stream(storage, key, start, end, 206, headers)


def _stream(storage: Storage, key: str, start: int, end: int, status: int, headers: dict[str, str]) -> Response:
    if end < start:
        return Response(b"", status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(storage.read_range(key, start, end), status_code=status, headers=headers,
                             media_type="application/octet-stream")  # fmt: skip


class RangeNotSatisfiableError(ValueError):
    """The requested range starts past the end of the file (answered 416, not an error of ours)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive for a single byte range, or None to send everything.

    Raises :class:`RangeNotSatisfiableError` for a range that starts past the end.

    Multi-range and malformed headers are ignored (the whole file is sent), as RFC 9110 allows.
    """
    if not header:
        return None
    match = _RANGE_RE.match(header.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiableError(header)
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size:
        raise RangeNotSatisfiableError(header)
    return None if last and int(last) < start else (start, end)

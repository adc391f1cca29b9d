"""A real HTTP file server on loopback, with the faults a device meets in the field, for tests.

:class:`FileServer` serves directories under URL prefixes from a thread (``ThreadingHTTPServer``
on ``127.0.0.1``, port 0), answers ``Range: bytes=N-`` with 206, and counts every byte it sends.
Faults are injected per URL path (an exact path, or a suffix such as ``"manifest.json"``):

- :meth:`FileServer.cut_after`: send the headers and the first N bytes, then drop the connection;
- :meth:`FileServer.serve_bytes`: answer with other bytes (tampered or old metadata);
- :meth:`FileServer.fail_with`: answer with an HTTP error status;
- :meth:`FileServer.drip`: send the body a few bytes at a time (a slow-retrieval attack).

:meth:`FileServer.for_repository` serves a :class:`~bundles.tuf.repository.TufRepository` directory
under the fleet server's paths (``/tuf/metadata/``, ``/tuf/targets/``). Example::

    with FileServer.for_repository(repo_dir) as server:
        server.cut_after("model.tar.gz", 50_000)
        client = TufClient(..., server.url("/tuf/metadata/"), server.url("/tuf/targets/"), ...)

Only the standard library is used, so the device agent's and the server's tests can share it.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CHUNK_BYTES = 64 * 1024


@dataclass
class ServedRequest:
    """One request as the server saw it, for assertions in tests."""

    path: str
    range: str | None
    status: int
    bytes_sent: int
    headers: dict[str, str]


@dataclass
class _Fault:
    match: str
    times: int | None
    cut_after_bytes: int | None = None
    body: bytes | None = None
    status: int | None = None
    drip: tuple[int, float] | None = None


class FileServer:
    """Serve directories over HTTP on 127.0.0.1 with Range support, byte counting and fault injection."""

    def __init__(self, routes: Mapping[str, str | Path], *, required_headers: Mapping[str, str] | None = None) -> None:
        self.routes = {prefix if prefix.endswith("/") else prefix + "/": Path(d) for prefix, d in routes.items()}
        self.required_headers = dict(required_headers or {})
        self.requests: list[ServedRequest] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_repository(cls, repo_dir: str | Path, **kwargs: Any) -> FileServer:
        """Serve a TUF repository directory at ``/tuf/metadata/`` and ``/tuf/targets/``."""
        repo = Path(repo_dir)
        return cls({"/tuf/metadata/": repo / "metadata", "/tuf/targets/": repo / "targets"}, **kwargs)

    # --- life cycle ---------------------------------------------------------------------------------
    def start(self) -> FileServer:
        """Bind 127.0.0.1 on a free port and serve from a daemon thread."""
        handler = type("_BoundHandler", (_Handler,), {"file_server": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="tuf-file-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` on this server."""
        return self.base_url + "/" + path.lstrip("/")

    # --- faults -------------------------------------------------------------------------------------
    def cut_after(self, match: str, n_bytes: int, times: int | None = 1) -> None:
        """Drop the connection after ``n_bytes`` of the body of matching requests (``times`` times)."""
        self._add_fault(_Fault(match, times, cut_after_bytes=n_bytes))

    def serve_bytes(self, match: str, body: bytes, times: int | None = None) -> None:
        """Answer matching requests with ``body`` instead of the file (tampered, old, or made-up content)."""
        self._add_fault(_Fault(match, times, body=body))

    def drip(self, match: str, chunk_bytes: int, interval_s: float, times: int | None = 1) -> None:
        """Send matching bodies ``chunk_bytes`` at a time, pausing ``interval_s`` between (a trickling server)."""
        self._add_fault(_Fault(match, times, drip=(chunk_bytes, interval_s)))

    def fail_with(self, match: str, status: int, times: int | None = 1) -> None:
        """Answer matching requests with HTTP ``status`` and no body."""
        self._add_fault(_Fault(match, times, status=status))

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        with self._lock:
            self._faults.clear()

    # --- observations -------------------------------------------------------------------------------
    def bytes_served(self, match: str | None = None) -> int:
        """Body bytes sent, in total or for requests matching ``match``."""
        with self._lock:
            return sum(r.bytes_sent for r in self.requests if match is None or _matches(r.path, match))

    def requests_for(self, match: str) -> list[ServedRequest]:
        """The requests whose path matches ``match``, in order."""
        with self._lock:
            return [r for r in self.requests if _matches(r.path, match)]

    # --- used by the handler ----------------------------------------------------------------------
    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if _matches(path, fault.match):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _record(self, request: ServedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _resolve(self, path: str) -> Path | None:
        for prefix, directory in self.routes.items():
            if path.startswith(prefix):
                relative = path[len(prefix) :]
                candidate = (directory / relative).resolve()
                if relative and candidate.is_relative_to(directory.resolve()) and candidate.is_file():
                    return candidate
        return None


def _matches(path: str, match: str) -> bool:
    """A URL path matches an exact path or a suffix (``"manifest.json"``, ``"/3.snapshot.json"``)."""
    return path == match or path.endswith(match)


class _Handler(BaseHTTPRequestHandler):
    """Serves one request for the owning :class:`FileServer` (set as a class attribute)."""

    file_server: FileServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes; do not wait for ACKs

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Keep test output quiet."""

    def do_GET(self) -> None:  # noqa: N802
        path = unquote(urlsplit(self.path).path)
        server = self.file_server
        if any(self.headers.get(k) != v for k, v in server.required_headers.items()):
            self._send_status(path, 401)
            return
        fault = server._take_fault(path)  # noqa: SLF001
        if fault is not None and fault.status is not None:
            self._send_status(path, fault.status)
            return
        body = self._body(path, fault)
        if body is None:
            self._send_status(path, 404)
            return
        self._send_body(path, body, fault)

    def _body(self, path: str, fault: _Fault | None) -> bytes | None:
        if fault is not None and fault.body is not None:
            return fault.body
        file = self.file_server._resolve(path)  # noqa: SLF001
        return None if file is None else file.read_bytes()

    def _send_body(self, path: str, body: bytes, fault: _Fault | None) -> None:
        cut_after = fault.cut_after_bytes if fault else None
        start, status = self._range_start(len(body))
        if status == 416:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._log(path, 416, 0)
            return
        part = body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        data = part if cut_after is None else part[:cut_after]
        sent = self._write(data) if fault is None or fault.drip is None else self._trickle(data, *fault.drip)
        self._log(path, status, sent)
        if cut_after is not None and cut_after < len(part):
            self._drop_connection()

    def _range_start(self, size: int) -> tuple[int, int]:
        header = self.headers.get("Range")
        match = _RANGE.match(header or "")
        if match is None:
            return 0, 200
        start = int(match[1])
        return (start, 206) if start < size else (0, 416)

    def _write(self, data: bytes) -> int:
        sent = 0
        try:
            for i in range(0, len(data), _CHUNK_BYTES):
                chunk = data[i : i + _CHUNK_BYTES]
                self.wfile.write(chunk)
                sent += len(chunk)
            self.wfile.flush()
        except OSError:
            pass
        return sent

    def _trickle(self, data: bytes, chunk_bytes: int, interval_s: float) -> int:
        sent = 0
        try:
            for i in range(0, len(data), chunk_bytes):
                self.wfile.write(data[i : i + chunk_bytes])
                self.wfile.flush()
                sent += len(data[i : i + chunk_bytes])
                time.sleep(interval_s)  # the fault being simulated: a slow server, not synchronisation
        except OSError:
            pass
        return sent

    def _drop_connection(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_status(self, path: str, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self._log(path, status, 0)

    def _log(self, path: str, status: int, sent: int) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.file_server._record(ServedRequest(path, self.headers.get("Range"), status, sent, headers))  # noqa: SLF001


__all__ = ["FileServer", "ServedRequest"]

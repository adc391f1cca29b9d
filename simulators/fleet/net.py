"""The network between virtual devices and the fleet server(s): a load balancer with faults.

Every device gets its own :class:`DeviceLink` (an ``httpx.BaseTransport``) over one shared
:class:`Balancer`, which holds the connection pools to the server processes and sends each request
to the next live one (round robin; a process that refuses connections is skipped for a few seconds,
as a load balancer's health check would). The device's real clients (``FleetClient``, the TUF
fetcher, the telemetry uploader) are ordinary ``httpx.Client`` objects on that transport, so the
faults below hit the agent's real retry, resume and verification code:

* packet loss: a request fails to connect (``httpx.ConnectError``);
* a cut download: a TUF target's body stops half-way (``httpx.ReadError``); the fetcher resumes
  with ``Range``;
* a corrupt or tampered download: one byte of a target's body is flipped; TUF refuses the file.

The link also counts the bytes each device sent and received (the report's bytes transferred).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence

import httpx

TARGETS_PREFIX = "/tuf/targets/"


class Balancer(httpx.BaseTransport):
    """Round robin over server processes on loopback ports, skipping ones that refuse connections."""

    def __init__(self, ports: Sequence[int], pool_size: int = 64, dead_for_s: float = 2.0) -> None:
        limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
        self.ports = list(ports)
        self.transport = httpx.HTTPTransport(limits=limits, retries=0)
        self.dead_until: dict[int, float] = {}
        self.dead_for_s = dead_for_s
        self._next = 0
        self._lock = threading.Lock()

    def set_ports(self, ports: Sequence[int]) -> None:
        with self._lock:
            self.ports = list(ports)

    def _candidates(self) -> list[int]:
        with self._lock:
            self._next += 1
            ports = self.ports[self._next % len(self.ports) :] + self.ports[: self._next % len(self.ports)]
        now = time.monotonic()
        live = [p for p in ports if self.dead_until.get(p, 0.0) <= now]
        return live or ports

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        error: httpx.TransportError | None = None
        for port in self._candidates():
            request.url = request.url.copy_with(port=port)
            try:
                return self.transport.handle_request(request)
            except httpx.ConnectError as e:  # nothing was sent: safe to try the next process
                self.dead_until[port] = time.monotonic() + self.dead_for_s
                error = e
        assert error is not None
        raise error

    def close(self) -> None:
        self.transport.close()


class LinkStats:
    """Bytes and requests of one device (read by the report)."""

    __slots__ = ("bytes_down", "bytes_up", "requests", "faults")

    def __init__(self) -> None:
        self.bytes_down = self.bytes_up = self.requests = self.faults = 0


class DeviceLink(httpx.BaseTransport):
    """One device's view of the network: faults per its scenario, bytes counted."""

    def __init__(self, balancer: Balancer, rng: random.Random, packet_loss: float = 0.0, cut: float = 0.0,
                 corrupt: float = 0.0) -> None:  # fmt: skip
        self.balancer, self.rng = balancer, rng
        self.packet_loss, self.cut, self.corrupt = packet_loss, cut, corrupt
        self.stats = LinkStats()
        self.online = True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.stats.requests += 1
        if not self.online:
            raise httpx.ConnectError("simulated: the device is offline", request=request)
        if self.packet_loss and self.rng.random() < self.packet_loss:
            self.stats.faults += 1
            raise httpx.ConnectError("simulated packet loss", request=request)
        self.stats.bytes_up += len(request.content) if request.stream is None or _is_read(request) else 0
        response = self.balancer.handle_request(request)
        is_target = request.url.path.startswith(TARGETS_PREFIX) and response.status_code in (200, 206)
        cut = is_target and self.cut > 0 and self.rng.random() < self.cut
        corrupt = is_target and self.corrupt > 0 and self.rng.random() < self.corrupt
        self.stats.faults += cut + corrupt
        stream = FaultyStream(response.stream, self.stats, cut, corrupt)  # type: ignore[arg-type]
        return httpx.Response(response.status_code, headers=response.headers, stream=stream,
                              extensions=response.extensions, request=request)  # fmt: skip


def _is_read(request: httpx.Request) -> bool:
    try:
        request.content  # noqa: B018 - raises if the body is a stream not read yet
    except httpx.RequestNotRead:
        return False
    return True


class FaultyStream(httpx.SyncByteStream):
    """A response body that counts its bytes and, when asked, stops half-way or flips a byte."""

    def __init__(self, inner: httpx.SyncByteStream, stats: LinkStats, cut: bool, corrupt: bool) -> None:
        self.inner, self.stats, self.cut, self.corrupt = inner, stats, cut, corrupt

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for chunk in self.inner:
            if self.corrupt and chunk:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                self.corrupt = False
            if self.cut and sent > 0:
                raise httpx.ReadError("simulated: connection cut mid-download")
            if self.cut and len(chunk) > 1:
                half = chunk[: len(chunk) // 2]
                self.stats.bytes_down += len(half)
                yield half
                raise httpx.ReadError("simulated: connection cut mid-download")
            sent += len(chunk)
            self.stats.bytes_down += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()

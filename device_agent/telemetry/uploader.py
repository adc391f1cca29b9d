"""Uploads: the offline buffer drained in gzip batches to ``POST /api/v1/device/telemetry``.

A batch keeps its ``batch_id`` until the server acknowledges it, so a retry after a timeout or a
lost answer is the same batch and the server counts it once (idempotent by device and batch id).
Failures (transport errors, 5xx, 408, 429) back off exponentially with jitter (``backoff_initial_s``
doubling up to ``backoff_max_s``); a batch the server refuses for good (any other 4xx but 401/403,
e.g. a 400 naming a field it will not take) is dropped, counted as ``<kind>:rejected`` (reported to
the server in the next batch's ``drops`` event) and draining goes on, since sending the same bytes
again cannot help and must not hold back what follows.

The buffer picks batches by their compressed size, but the server limits the decompressed body
(``max_telemetry_bytes``, 4 MiB by default). Before its first send, a batch whose JSON is over
``max_body_bytes`` is halved (the rest goes back to the buffer for later batches) until it fits; a
single item over the limit is dropped and counted as ``<kind>:too_large``. Keep ``max_body_bytes`` at
or under the server's limit, so that no batch is ever refused for its size.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from bundles.errors import AuthError, ServerError, TransportError
from device_agent.telemetry.buffer import Batch, TelemetryBuffer

log = logging.getLogger("device_agent.telemetry.uploader")
TELEMETRY_PATH = "/api/v1/device/telemetry"
RETRIED_CLIENT_STATUSES = (408, 429)
"""4xx answers that say "later", not "never": the batch is kept and sent again."""
MAX_BODY_BYTES = 4 * 1024**2
"""The fleet server's default limit on a decompressed telemetry body (``max_telemetry_bytes``)."""


@dataclass(frozen=True)
class UploadReport:
    """What one :meth:`TelemetryUploader.drain` did."""

    batches: int
    items: int
    duplicates: int
    rejected: int = 0


class TelemetryUploader:
    """Sends the buffer's batches with backoff; see the module docstring."""

    def __init__(
        self,
        buffer: TelemetryBuffer,
        client: httpx.Client,
        headers: Callable[[], Mapping[str, str]] = dict,
        url: str = TELEMETRY_PATH,
        batch_max_items: int = 500,
        batch_max_bytes: int = 1_000_000,
        max_body_bytes: int = MAX_BODY_BYTES,
        backoff_initial_s: float = 5.0,
        backoff_max_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.buffer, self.client, self.headers, self.url = buffer, client, headers, url
        self.batch_max_items, self.batch_max_bytes = batch_max_items, batch_max_bytes
        self.max_body_bytes = max_body_bytes
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.clock = clock
        self.failures = 0
        self.next_attempt_at = 0.0
        self.rejected_batches = 0

    def send(self, batch: Batch, raw: bytes | None = None) -> bool | None:
        """POST one batch (``raw``: its JSON, if already made); True if the server says it already had it,
        None if it refused it for good (the batch is dropped and counted). Raises on failure."""
        body = gzip.compress(raw if raw is not None else _json_of(batch), 6)
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip", **self.headers()}
        try:
            response = self.client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as e:
            raise TransportError(f"telemetry upload to {self.url} failed: {e}") from e
        if response.status_code in (401, 403):
            raise AuthError(f"telemetry upload refused ({response.status_code}): the device credentials are not valid")
        if 400 <= response.status_code < 500 and response.status_code not in RETRIED_CLIENT_STATUSES:
            self.buffer.reject(batch.batch_id, "rejected")
            self.rejected_batches += 1
            log.warning("telemetry batch %s refused (%d), dropped: %s", batch.batch_id, response.status_code,
                        response.text[:300])  # fmt: skip
            return None
        if response.status_code >= 300:
            raise ServerError(f"telemetry upload got {response.status_code} from the server")
        self.buffer.ack(batch.batch_id)
        return bool(_json_or_empty(response).get("duplicate", False))

    def drain(self, max_batches: int = 100) -> UploadReport:
        """Send batches until the buffer is empty, ``max_batches`` were sent, or one fails (re-raised)."""
        batches = items = duplicates = rejected = 0
        for _ in range(max_batches):
            fitting = self._next_fitting_batch()
            if fitting is None:
                break
            batch, raw = fitting
            answer = self.send(batch, raw)
            if answer is None:
                rejected += 1
                continue
            duplicates += answer
            batches, items = batches + 1, items + len(batch)
        return UploadReport(batches, items, duplicates, rejected)

    def _next_fitting_batch(self) -> tuple[Batch, bytes] | None:
        """The next batch and its JSON, halved until it fits ``max_body_bytes`` (module docstring)."""
        while (batch := self.buffer.next_batch(self.batch_max_items, self.batch_max_bytes)) is not None:
            raw = _json_of(batch)
            if len(raw) <= self.max_body_bytes:
                return batch, raw
            if len(batch) > 1:
                self.buffer.shrink(batch.batch_id, len(batch) // 2)
            else:
                self.buffer.reject(batch.batch_id, "too_large")
        return None

    def maybe_drain(self) -> UploadReport | None:
        """Drain unless backing off; on failure schedule the next attempt. None when it did not try."""
        if self.clock() < self.next_attempt_at:
            return None
        try:
            report = self.drain()
        except (TransportError, AuthError):
            self.failures += 1
            self.next_attempt_at = self.clock() + self.backoff_s()
            return None
        self.failures, self.next_attempt_at = 0, 0.0
        return report

    def backoff_s(self) -> float:
        """Exponential backoff with full jitter over the last half (5 s, 10 s, 20 s ... 600 s)."""
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(self.failures - 1, 0))
        return float(ceiling / 2 + random.uniform(0.0, ceiling / 2))  # noqa: S311 - jitter, not security

    def run(self, stop: threading.Event, interval_s: float, before_drain: Callable[[], object] = lambda: None) -> None:
        """Loop until ``stop`` is set: every ``interval_s`` call ``before_drain`` (e.g. close windows) and drain."""
        while not stop.wait(interval_s):
            before_drain()
            self.maybe_drain()


def _json_of(batch: Batch) -> bytes:
    return json.dumps(batch.to_dict(), separators=(",", ":")).encode("utf-8")


def _json_or_empty(response: httpx.Response) -> dict[str, object]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}

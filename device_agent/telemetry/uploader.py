"""Uploads: the offline buffer drained in gzip batches to ``POST /api/v1/device/telemetry``.

A batch keeps its ``batch_id`` until the server acknowledges it, so a retry after a timeout or a
lost answer is the same batch and the server counts it once (idempotent by device and batch id).
Failures (transport errors, 5xx, 408, 429) back off exponentially with jitter (``backoff_initial_s``
doubling up to ``backoff_max_s``), and never retry before the server's ``Retry-After``
(:mod:`device_agent.retry_after`); a batch the server refuses for good (any other 4xx but 401/403,
e.g. a 400 naming a field it will not take) is dropped, counted as ``<kind>:rejected`` (reported to
the server in the next batch's ``drops`` event) and draining goes on, since sending the same bytes
again cannot help and must not hold back what follows.

A 5xx is either an outage (keep everything, back off) or a server bug that fails on this one batch
(a poison batch, which would otherwise be sent again forever with every later item queued behind it).
To tell them apart, the batch that got the 5xx is held back and the next batch (other items, its own
id) is sent at once, up to ``max_probes`` (2) batches in a row. If the server acknowledges one (or
refuses it with a 4xx: it is up and answering), every batch held back before it takes a *strike*,
stored on its rows in the buffer (a restart keeps it), and draining goes on; the struck batches are
sent again, first, at the next drain, with the same id. A batch with ``max_strikes``
(:data:`MAX_STRIKES`, 3) strikes is dropped with a WARNING naming it and the status, and counted as
``<kind>:server_error`` (reported like the other drops). If the probes fail too (or nothing is left
to probe with), it is an outage: the error is raised, the uploader backs off, no strike is counted
and nothing is dropped. Two poison batches in a row are told from an outage (``max_probes`` 2); more
in a row look like an outage and are kept. A transport error (refused, reset, timeout) is always
treated as an outage, and so is a 5xx with ``Retry-After`` (the fleet server's 503 while its database
is busy or down): nothing is sent before the time it asked for.

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
from dataclasses import dataclass, field

import httpx

from bundles.errors import AuthError, ServerError, TransportError
from device_agent.retry_after import retry_after_s, retry_wait_s
from device_agent.telemetry.buffer import Batch, TelemetryBuffer

log = logging.getLogger("device_agent.telemetry.uploader")
TELEMETRY_PATH = "/api/v1/device/telemetry"
RETRIED_CLIENT_STATUSES = (408, 429)
"""4xx answers that say "later", not "never": the batch is kept and sent again."""
MAX_BODY_BYTES = 4 * 1024**2
"""The fleet server's default limit on a decompressed telemetry body (``max_telemetry_bytes``)."""
MAX_STRIKES = 3
"""5xx answers a batch may get, each while the server acknowledged another batch, before it is dropped
(``<kind>:server_error``): one strike per drain, so at the default 60 s upload interval a poison batch
holds nothing back and is gone after about three minutes, while a transient failure is retried."""
MAX_PROBES = 2
"""Batches sent at once after a 5xx to learn whether the server is up (module docstring)."""


class BatchServerError(ServerError):
    """A 5xx answer to one batch: an outage, or a server bug on this batch; ``status`` is the answer's
    (``retry_after_s``: the server said it is unavailable until then, an outage)."""

    def __init__(self, message: str, status: int, retry_after_s: float | None = None) -> None:
        super().__init__(message, retry_after_s)
        self.status = status


@dataclass(frozen=True)
class UploadReport:
    """What one :meth:`TelemetryUploader.drain` did."""

    batches: int
    items: int
    duplicates: int
    rejected: int = 0
    strikes: int = 0
    """Strikes counted: 5xx answers to a batch while the server acknowledged another."""
    server_errors: int = 0
    """Batches dropped after :data:`MAX_STRIKES` strikes (``<kind>:server_error``)."""


@dataclass
class _Drain:
    """The bookkeeping of one drain: counts, batches held back, suspects (5xx, server not yet proven up)."""

    batches: int = 0
    items: int = 0
    duplicates: int = 0
    rejected: int = 0
    strikes: int = 0
    server_errors: int = 0
    held_back: set[str] = field(default_factory=set)
    suspects: dict[str, BatchServerError] = field(default_factory=dict)

    def report(self) -> UploadReport:
        return UploadReport(self.batches, self.items, self.duplicates, self.rejected, self.strikes, self.server_errors)


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
        max_strikes: int = MAX_STRIKES,
        max_probes: int = MAX_PROBES,
    ) -> None:
        self.buffer, self.client, self.headers, self.url = buffer, client, headers, url
        self.batch_max_items, self.batch_max_bytes = batch_max_items, batch_max_bytes
        self.max_body_bytes = max_body_bytes
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.clock = clock
        self.failures = 0
        self.next_attempt_at = 0.0
        self.rejected_batches = 0
        self.max_strikes, self.max_probes = max(1, max_strikes), max(1, max_probes)
        self.server_error_batches = 0
        """Batches dropped so far after :data:`MAX_STRIKES` strikes."""

    def send(self, batch: Batch, raw: bytes | None = None) -> bool | None:
        """POST one batch (``raw``: its JSON, if already made); True if the server says it already had it,
        None if it refused it for good (the batch is dropped and counted). Raises on failure
        (:class:`BatchServerError` on a 5xx)."""
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
        if response.status_code >= 500:
            raise BatchServerError(f"telemetry upload got {response.status_code} from the server", response.status_code,
                                   retry_after_s(response.headers))  # fmt: skip
        if response.status_code >= 300:
            raise ServerError(f"telemetry upload got {response.status_code} from the server",
                              retry_after_s(response.headers))  # fmt: skip
        self.buffer.ack(batch.batch_id)
        return bool(_json_or_empty(response).get("duplicate", False))

    def drain(self, max_batches: int = 100) -> UploadReport:
        """Send batches until the buffer is empty, ``max_batches`` were sent, or the server is down (raised).

        A 5xx holds the batch back and the next batches go at once (module docstring): an answer to
        one of them strikes the batches held back before it; ``max_probes`` 5xx in a row after the
        first, or nothing left to probe with, is an outage (raised, no strike).
        """
        run = _Drain()
        for _ in range(max_batches):
            fitting = self._next_fitting_batch(run.held_back)
            if fitting is None:
                break
            batch, raw = fitting
            try:
                answer = self.send(batch, raw)
            except BatchServerError as e:
                if e.retry_after_s is not None:  # "unavailable, come back then": an outage, nothing to probe
                    raise
                run.held_back.add(batch.batch_id)
                run.suspects[batch.batch_id] = e
                if len(run.suspects) > self.max_probes:
                    raise
                continue
            self._strike_suspects(run)
            if answer is None:
                run.rejected += 1
                continue
            run.duplicates += answer
            run.batches, run.items = run.batches + 1, run.items + len(batch)
        if run.suspects:  # no batch answered after them: the server may be down
            raise next(reversed(run.suspects.values()))
        return run.report()

    def _strike_suspects(self, run: _Drain) -> None:
        """The server answered a batch: each batch that got a 5xx before it in this drain takes a strike
        (persisted in the buffer); one with ``max_strikes`` is dropped as ``<kind>:server_error``."""
        for batch_id, error in run.suspects.items():
            strikes = self.buffer.strike(batch_id)
            run.strikes += 1
            if strikes < self.max_strikes:
                log.info("telemetry batch %s got %d while the server took another batch: strike %d of %d, held back",
                         batch_id, error.status, strikes, self.max_strikes)  # fmt: skip
                continue
            self.buffer.reject(batch_id, "server_error")
            run.server_errors += 1
            self.server_error_batches += 1
            log.warning("telemetry batch %s dropped: the server answered %d to it %d times while it took other "
                        "batches", batch_id, error.status, strikes)  # fmt: skip
        run.suspects.clear()

    def _next_fitting_batch(self, held_back: set[str] | frozenset[str] = frozenset()) -> tuple[Batch, bytes] | None:
        """The next batch not held back and its JSON, halved until it fits ``max_body_bytes`` (module docstring)."""
        while (batch := self.buffer.next_batch(self.batch_max_items, self.batch_max_bytes, held_back)) is not None:
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
        except (TransportError, AuthError) as error:
            self.failures += 1
            self.next_attempt_at = self.clock() + retry_wait_s(error, self.backoff_s(), self.backoff_max_s)
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

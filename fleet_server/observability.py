"""Prometheus metrics and the request-timing middleware.

Each app owns its own ``CollectorRegistry`` (tests build many apps in one process). With several
worker processes (``edgefleet-server run --workers N``) every worker would answer ``/metrics`` with
its own counts, so a scrape would see whichever worker it reached: ``run`` then turns on the
Prometheus client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a fresh directory in the data
directory), every worker writes its values there, and :func:`exposition` answers with the sum over
all of them. The 304 ratio is then computed from the summed poll counters. The middleware is
plain ASGI (no per-request task or body copy) because it sits on the desired-state hot path. The
route template (``/api/v1/device/desired-state``), never the raw path, labels a request, and unknown
methods are folded into ``other``, so that label cardinality stays bounded whatever clients send.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
RATIO_NAME = "edgefleet_desired_state_not_modified_ratio"
RATIO_HELP = "Share of polls answered 304 since start"


def multiprocess() -> bool:
    """Whether this process writes its metrics for a multi-worker exposition (``run --workers N``)."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
TICK_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The server's Prometheus series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_latency_s = Histogram(
            "edgefleet_http_request_duration_seconds", "HTTP request latency", ["method", "route", "status"],
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.polls = Counter(
            "edgefleet_desired_state_polls_total", "Desired-state polls by result", ["result"], registry=self.registry
        )
        if not multiprocess():  # (with several workers the ratio is computed from the summed counters)
            self.not_modified = Gauge(RATIO_NAME, RATIO_HELP, registry=self.registry)
            self.not_modified.set_function(self.not_modified_ratio)
        self.uploads = Counter(
            "edgefleet_publications_total", "Bundle publications by result", ["result"], registry=self.registry
        )
        self.upload_bytes = Counter(
            "edgefleet_publication_bytes_total", "Bytes of accepted publications", registry=self.registry
        )
        self.telemetry_rows = Counter(
            "edgefleet_telemetry_rows_total", "Telemetry rows stored by kind", ["kind"], registry=self.registry
        )
        self.telemetry_batches = Counter(
            "edgefleet_telemetry_batches_total", "Telemetry batches by result", ["result"], registry=self.registry
        )
        self.rollout_tick_s = Histogram(
            "edgefleet_rollout_tick_duration_seconds", "Rollout engine tick duration (fold and every evaluation)",
            buckets=TICK_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.rollout_evaluation_failures = Counter(
            "edgefleet_rollout_evaluation_failures_total", "Rollout evaluations that raised (the rollout paused)",
            registry=self.registry,
        )  # fmt: skip
        self.rollout_decisions = Counter(
            "edgefleet_rollout_decisions_total",
            "Rollout engine decisions by action",
            ["action"],
            registry=self.registry,
        )
        self.rollout_tick_failures = Counter(
            "edgefleet_rollout_tick_failures_total", "Rollout engine ticks that raised (retried at the next tick)",
            registry=self.registry,
        )  # fmt: skip
        self.invalid_events = Counter(
            "edgefleet_telemetry_invalid_events_total", "Stored install events and heartbeats the fold left out",
            registry=self.registry,
        )  # fmt: skip
        self.invalid_windows = Counter(
            "edgefleet_telemetry_invalid_windows_total", "Stored windows left out of rollout figures (broken contract)",
            registry=self.registry,
        )  # fmt: skip
        self.background_leader = Gauge(
            "edgefleet_background_leader", "1 in the process that runs the background tasks", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip

    def not_modified_ratio(self) -> float:
        """Share of polls answered 304 so far (the Prometheus query is rate(...{result="304"}) / rate(...))."""
        values = {
            s.labels["result"]: s.value for m in self.polls.collect() for s in m.samples if s.name.endswith("_total")
        }
        total = sum(values.values())
        return values.get("not_modified", 0.0) / total if total else 0.0


def exposition(metrics: Metrics) -> bytes:
    """The Prometheus text of this process, or of every worker summed in multiprocess mode."""
    if not multiprocess():
        return bytes(generate_latest(metrics.registry))
    registry = CollectorRegistry()
    collector = MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(_PollRatio(collector))
    return bytes(generate_latest(registry))


def forget_this_process() -> None:
    """At shutdown, in multiprocess mode: drop this process's live gauges (its counters stay counted)."""
    if multiprocess():
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


class _PollRatio(Collector):
    """The 304 ratio over every worker's poll counters."""

    def __init__(self, source: MultiProcessCollector) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        values: dict[str, float] = {}
        for family in self.source.collect():  # type: ignore[no-untyped-call]
            if family.name == "edgefleet_desired_state_polls":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        values[sample.labels["result"]] = values.get(sample.labels["result"], 0.0) + sample.value
        total = sum(values.values())
        yield GaugeMetricFamily(RATIO_NAME, RATIO_HELP, value=values.get("not_modified", 0.0) / total if total else 0.0)


class MetricsMiddleware:
    """Times every HTTP request and counts it by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._series: dict[tuple[str, str, str], Any] = {}  # label lookups cached: this runs on every poll

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder: dict[str, Any] = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or scope.get("edgefleet.route", "unmatched")
            self._series_for(scope["method"], template, status_holder["status"]).observe(time.perf_counter() - started)

    def _series_for(self, method: str, route: str, status: int) -> Any:
        key = (method if method in KNOWN_METHODS else "other", route, str(status))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self.metrics.request_latency_s.labels(*key)
        return series

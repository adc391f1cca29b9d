"""The endpoint's Prometheus series (``GET /metrics``).

One registry per app (tests build many apps in one process). With several workers
(``edgefleet-server inference --workers N``) the CLI turns on the Prometheus client's multiprocess
mode, as ``edgefleet-server run`` does, and :func:`exposition` sums every worker's values.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from fleet_server.observability import multiprocess

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
QUEUE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class InferenceMetrics:
    """Batch sizes, queue times, request latency and outcomes, loaded models."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch_size = Histogram(
            "edgefleet_inference_batch_size", "Rows per model call", ["model"], buckets=BATCH_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.queue_time_s = Histogram(
            "edgefleet_inference_queue_seconds", "Time a request waited for its batch", ["model"],
            buckets=QUEUE_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.request_latency_s = Histogram(
            "edgefleet_inference_request_duration_seconds", "Inference request latency (body to answer)", ["model"],
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "edgefleet_inference_requests_total", "Inference requests by status", ["model", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.loaded_models = Gauge(
            "edgefleet_inference_loaded_models", "Models loaded in this process", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.loaded_bytes = Gauge(
            "edgefleet_inference_loaded_bytes", "Estimated memory of the loaded models", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip

    def request_done(self, model: str, status: str, latency_s: float | None) -> None:
        """Count one request (and its latency when answered); the labelled series are looked up once."""
        children = self._children.get((model, status))
        if children is None:
            if len(self._children) > 10_000:  # unknown model names come from clients: bounded
                self._children.clear()
            children = (self.requests.labels(model, status), self.request_latency_s.labels(model))
            self._children[(model, status)] = children
        children[0].inc()
        if latency_s is not None:
            children[1].observe(latency_s)


def exposition(metrics: InferenceMetrics) -> bytes:
    """This process's series, or every worker's summed in multiprocess mode."""
    if not multiprocess():
        return bytes(generate_latest(metrics.registry))
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return bytes(generate_latest(registry))

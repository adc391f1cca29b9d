"""The health check of a freshly activated bundle: golden self-test, latency and memory budgets.

A bundle passes when its golden inputs reproduce their expected outputs in this device's real
runtime (the predictor's ``self_test``), when the median latency over a few golden runs stays within
the manifest's ``runtime_config.budget_latency_ms`` (times a configurable slack), and when the
resident memory the model added at load stays within ``budget_memory_mb`` (times a slack).
Budgets the manifest does not set are not checked.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from bundles.errors import InstallError
from bundles.manifest import Manifest
from bundles.tensors import decode_tensor


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def golden_inputs(manifest: Manifest) -> list[dict[str, np.ndarray]]:
    """The decoded inputs of every golden case."""
    return [{k: decode_tensor(v) for k, v in case.inputs.items()} for case in manifest.golden.cases]


def median_latency_ms(predictor: Any, inputs: list[dict[str, np.ndarray]], runs: int) -> float | None:
    """Median wall time of ``predictor.predict`` over ``runs`` passes of the golden inputs."""
    if not inputs:
        return None
    timings = []
    for i in range(max(1, runs)):
        start = time.perf_counter()
        predictor.predict(inputs[i % len(inputs)])
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def check_health(
    predictor: Any,
    manifest: Manifest,
    load_rss_mb: float,
    runs: int = 5,
    latency_slack: float = 1.5,
    memory_slack: float = 1.5,
) -> dict[str, Any]:
    """Run the checks; return the measured figures, or raise an error naming the failed check.

    Raises:
        SelfTestError: golden outputs differ beyond the manifest's tolerance.
        InstallError: a latency or memory budget is exceeded, or the bundle has no golden cases.
    """
    if not manifest.golden.cases:
        raise InstallError(f"{manifest.ref}: the bundle has no golden cases, so it cannot be self-tested")
    predictor.self_test()
    latency = median_latency_ms(predictor, golden_inputs(manifest), runs)
    budgets = manifest.runtime_config
    report: dict[str, Any] = {"self_test": "passed", "latency_ms": latency, "load_rss_mb": round(load_rss_mb, 2)}
    if budgets.budget_latency_ms is not None and latency is not None:
        limit = budgets.budget_latency_ms * latency_slack
        if latency > limit:
            raise InstallError(f"{manifest.ref}: median latency {latency:.2f} ms exceeds the budget ({limit:.2f} ms)")
    if budgets.budget_memory_mb is not None:
        limit = budgets.budget_memory_mb * memory_slack
        if load_rss_mb > limit:
            raise InstallError(
                f"{manifest.ref}: the model added {load_rss_mb:.1f} MiB, over the budget ({limit:.1f} MiB)"
            )
    return report

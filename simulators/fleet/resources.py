"""Server-side figures for the report: CPU and memory of the server processes, rollout tick quantiles.

CPU and resident memory come from ``/proc/<pid>/stat`` and ``/proc/<pid>/status`` of each server
process and its children (Linux; elsewhere the figures are left out). Tick quantiles are read from the
servers' Prometheus histogram ``edgefleet_rollout_tick_duration_seconds`` (bucket upper bounds, so a
quantile is the bound of the bucket it falls in).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [c for child in task.read_text().split() for c in _children(int(child))]
        except OSError:
            continue
    return found


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _rss_mb(pid: int) -> float:
    try:
        match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    except OSError:
        return 0.0
    return int(match.group(1)) / 1024 if match else 0.0


class ProcessSampler:
    """CPU seconds (last seen per process) and peak summed RSS of the server processes."""

    def __init__(self) -> None:
        self.cpu_by_pid: dict[int, float] = {}
        self.root_of: dict[int, int] = {}
        self.peak_rss_mb = 0.0
        self.first_cpu_at: float | None = None

    def sample(self, pids: Sequence[int]) -> None:
        rss = 0.0
        for root in pids:
            for pid in _children(root):
                self.cpu_by_pid[pid] = max(self.cpu_by_pid.get(pid, 0.0), _cpu_s(pid))
                self.root_of[pid] = root
                rss += _rss_mb(pid)
        self.peak_rss_mb = max(self.peak_rss_mb, rss)

    def summary(self) -> dict[str, float]:
        """Totals, and the CPU seconds of each server process (with its children): how the load was shared."""
        by_root: dict[int, float] = {}
        for pid, cpu in self.cpu_by_pid.items():
            by_root[self.root_of[pid]] = by_root.get(self.root_of[pid], 0.0) + cpu
        shares = {f"server_cpu_s_process_{i}": round(cpu, 1) for i, cpu in enumerate(by_root.values())}
        return {
            "server_cpu_s": round(sum(self.cpu_by_pid.values()), 1),
            "server_peak_rss_mb": round(self.peak_rss_mb, 1),
            **shares,
        }


def histogram_quantiles(texts: Sequence[str], name: str, qs: Sequence[float], label: str) -> dict[str, float]:
    """Quantiles (as bucket upper bounds, in ms) of a Prometheus histogram summed over several scrapes."""
    buckets: dict[float, float] = {}
    pattern = re.compile(rf'^{re.escape(name)}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$', re.MULTILINE)
    for text in texts:
        for le, value in pattern.findall(text):
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
    if not buckets or buckets.get(float("inf"), 0.0) == 0:
        return {}
    total = buckets[float("inf")]
    out: dict[str, float] = {f"{label}_count": total}
    for q in qs:
        bound = next(b for b in sorted(buckets) if buckets[b] >= q * total)
        out[f"{label}_p{round(q * 100)}_ms"] = bound * 1000 if bound != float("inf") else float("inf")
    return out

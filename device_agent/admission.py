"""Admission control for the localhost API: a request's memory is reserved before its body is parsed.

A JSON tensor body costs far more memory parsed than on the wire (a Python float and its list slot
are ~32 bytes for the 2 to 20 characters of a number), so one large valid request could take the
agent out of memory. Three bounds, all before parsing:

1. **Per-device body limit** (``max_body_bytes``): refused by the HTTP server from the
   ``Content-Length`` header alone (413), before the body is read.
2. **Per-model limit**: the largest body the model's input schema can legitimately need (fixed
   dimensions times the largest batch, times the widest JSON number); anything larger cannot be a
   valid request for that model (413), and declared shapes that cannot match are refused from the
   body's first bytes (400), before the data is parsed.
3. **Memory budget** (``memory_budget_bytes``, by default half of the memory this process may still
   use: the smallest of physical memory, the cgroup limit and ``RLIMIT_DATA``): each request reserves
   its worst-case parse cost; requests that do not fit wait up to ``queue_timeout_s`` (then 503) and a
   request larger than the whole budget is refused (413). Concurrency cannot add up past it.
"""

from __future__ import annotations

import math
import os
import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bundles.errors import BusyError, RequestTooLargeError
from bundles.manifest import Manifest

JSON_EXPANSION = 24
"""Worst-case bytes of parsed Python objects per byte of JSON number text ("0," is 2 bytes, ~40 parsed)."""
BINARY_EXPANSION = 3
"""A binary tensor body is copied about twice (the body, the array, a contiguous copy)."""
JSON_BYTES_PER_ELEMENT = 32
"""The widest JSON number a client may reasonably send per element (``-1.2345678901234567e-300, ``)."""
HEADER_ALLOWANCE_BYTES = 64 * 1024
"""Room for names, parameters and whitespace around the tensors."""


def device_memory_bytes() -> int:
    """The memory this process may use: physical memory, capped by its cgroup and by ``RLIMIT_DATA``."""
    limits = [_physical_bytes(), *_cgroup_limits()]
    soft, _hard = resource.getrlimit(resource.RLIMIT_DATA)
    if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
        limits.append(soft)
    return min(limit for limit in limits if limit > 0)


def rss_bytes() -> int:
    """Resident memory of this process now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def default_memory_budget_bytes() -> int:
    """Half of what this process may still allocate (at least 16 MiB)."""
    return max(16 * 2**20, (device_memory_bytes() - rss_bytes()) // 2)


def default_max_body_bytes(budget_bytes: int) -> int:
    """The per-device body limit: what a binary request may take of the budget, 1 to 64 MiB."""
    return int(min(64 * 2**20, max(2**20, budget_bytes // BINARY_EXPANSION)))


def _physical_bytes() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 2**40


def _cgroup_limits() -> list[int]:
    """Memory limits of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    found: list[int] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "":
            found.append(_read_limit(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"))
        elif "memory" in controllers.split(","):
            found.append(_read_limit(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"))
    return [limit for limit in found if 0 < limit < 2**60]


def _read_limit(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    return 0 if text == "max" else int(text)


def model_max_elements(manifest: Manifest, max_batch: int) -> int | None:
    """The most tensor elements one request for ``manifest`` can hold (None: the schema does not bound it).

    Dynamic dimensions count at their validated maximum (``dim_ranges``), else ``max_batch`` for the
    first (batch) dimension; a model whose pre-processing reshapes its inputs is not bounded here.
    """
    if manifest.preprocess:
        return None
    total = 0
    for spec in manifest.inputs:
        size = 1
        for axis, dim in enumerate(spec.shape):
            if dim != -1:
                size *= dim
            elif str(axis) in spec.dim_ranges:
                size *= spec.dim_ranges[str(axis)][1]
            elif axis == 0:
                size *= max_batch
            else:
                return None
        total += size
    return total


def model_max_body_bytes(manifest: Manifest, max_batch: int, binary: bool) -> int | None:
    """The largest body a valid request for ``manifest`` can need (None: not bounded by the schema)."""
    elements = model_max_elements(manifest, max_batch)
    if elements is None:
        return None
    per_element = 8 if binary else JSON_BYTES_PER_ELEMENT
    return elements * per_element + HEADER_ALLOWANCE_BYTES


def parse_cost_bytes(body_bytes: int, binary: bool) -> int:
    """The worst-case memory to decode and parse a body of ``body_bytes``."""
    return body_bytes * (BINARY_EXPANSION if binary else JSON_EXPANSION + 1)


class MemoryBudget:
    """Bytes reserved by the requests being parsed and run; a request waits or is refused when it cannot fit."""

    def __init__(self, budget_bytes: int, wait_s: float) -> None:
        self.budget_bytes, self.wait_s = budget_bytes, wait_s
        self.reserved_bytes = 0
        self._changed = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        """Take ``nbytes`` of the budget (give it back with :meth:`release`).

        Raises:
            RequestTooLargeError: ``nbytes`` exceeds the whole budget.
            BusyError: the budget stayed full for ``wait_s``.
        """
        if nbytes > self.budget_bytes:
            raise RequestTooLargeError(
                f"the request would need ~{_mib(nbytes)} MiB to parse; this device allows {_mib(self.budget_bytes)} MiB"
            )
        with self._changed:
            if self.reserved_bytes + nbytes > self.budget_bytes and not self._changed.wait_for(
                lambda: self.reserved_bytes + nbytes <= self.budget_bytes, self.wait_s
            ):
                raise BusyError(f"the device is busy: {_mib(self.reserved_bytes)} MiB of request memory in use")
            self.reserved_bytes += nbytes

    def try_acquire(self, nbytes: int) -> bool:
        """Take ``nbytes`` of the budget if it fits now, without waiting (False: nothing taken)."""
        with self._changed:
            if self.reserved_bytes + nbytes > self.budget_bytes:
                return False
            self.reserved_bytes += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._changed:
            self.reserved_bytes -= nbytes
            self._changed.notify_all()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget while the block runs (:meth:`acquire` / :meth:`release`)."""
        self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


def _mib(nbytes: int) -> str:
    return f"{math.ceil(nbytes / 2**20)}"


__all__ = [
    "MemoryBudget",
    "default_max_body_bytes",
    "default_memory_budget_bytes",
    "device_memory_bytes",
    "model_max_body_bytes",
    "model_max_elements",
    "parse_cost_bytes",
]

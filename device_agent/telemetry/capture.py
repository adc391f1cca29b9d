"""Routine answers captured on the request path without a lock, and handed to the windows in batches.

Most requests are routine: a local answer, no fallback. For those, the recorder's fast path
(``TelemetryRecorder.record_local``) does no more than :meth:`RoutineCapture.add`, in the request's own
thread and without a lock: the input row and the outputs a window reads become ``bytes`` (copied
while the request is still in the CPU's caches), the label a reference, and one tuple is appended to
a list. Every :data:`BIN_EVERY_ANSWERS` answers, and when a window closes, the recorder (under its
lock) takes the answers appended so far as one :class:`~device_agent.telemetry.windows.RoutineBatch`
that the window bins in one numpy pass (``WindowAccumulator.bin_routine``).

Why bytes now rather than the requests' arrays later: by then the model's own work has evicted them,
and a pass that reads hundreds of scattered dicts and arrays pays cache misses on each, about 2 µs
per request where it ran (``benchmarks/telemetry_overhead.py`` times the binning where it happens).
Why batches of thousands: each distinct numpy call of a pass costs microseconds when its code is
cold, so a pass is shared by as many answers as memory allows (~150 bytes each, plus the row).
Packing each answer into one contiguous buffer instead was measured too: it makes the pass cheaper
but the request path dearer (``struct.pack`` and a join per request), for no gain overall.

Why no lock: ``list.append`` is atomic, and the list is never replaced: :meth:`RoutineCapture.take`
copies the answers present and deletes that prefix (each one atomic), so an answer appended
meanwhile lands after it and waits for the next batch. A capture belongs to one (model, version) and
lives across windows, so an answer that races with a window closing is counted in the next window,
which is also where its request ended.

A window that reads no input or output (histograms turned off, or a bundle without a baseline,
declared ranges or float outputs) needs only each answer's latency: :class:`LatencyCapture`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np

from device_agent.telemetry.windows import BinPlan, RoutineBatch

T = TypeVar("T")

BIN_EVERY_ANSWERS = 4096
"""Answers captured before they are binned into the current window (and always when it closes)."""


class RoutineCapture:
    """The routine answers of one (model, version); see the module docstring.

    An answer fits when its feature tensor is a batch-1 array with the dtype of the first routine answer
    (its row shape is then the declared one: the predictor checked it, see ``BinPlan.fixed_rows``) and
    the outputs read have that first answer's byte size. Output dtypes are taken from the first answer:
    a model version's output dtypes do not change from one request to the next. Answers that do not
    fit go the general way (``WindowAccumulator.observe``).
    """

    __slots__ = ("tensor", "dtype", "row_nbytes", "reads_dtype", "reads_nbytes", "one_read", "many_reads", "label",
                 "answers", "on_full")  # fmt: skip

    def __init__(
        self,
        tensor: str,
        dtype: np.dtype[Any],
        row_nbytes: int,
        reads: Mapping[str, np.ndarray],
        label: str | None,
        on_full: Callable[[RoutineCapture], None],
    ) -> None:
        self.tensor, self.dtype, self.row_nbytes, self.on_full = tensor, dtype, row_nbytes, on_full
        self.reads_dtype = np.dtype([(n, a.dtype, (a.size,)) for n, a in reads.items()])  # a record per answer
        self.reads_nbytes = self.reads_dtype.itemsize
        names = tuple(reads)
        self.one_read = names[0] if len(names) == 1 else None
        self.many_reads = itemgetter(*names) if len(names) > 1 else None  # a tuple of arrays
        self.label = label  # the categorical output whose labels a window counts
        self.answers: list[tuple[bytes, bytes, Any, float]] = []  # (input row, outputs read, label, latency_ms)

    @classmethod
    def fitting(
        cls,
        plan: BinPlan,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, Any],
        on_full: Callable[[Any], None],
    ) -> RoutineCapture | LatencyCapture | None:
        """A capture shaped on the first routine answer of a (model, version), or None when its answers
        cannot be captured this way (features in several tensors, rows of varying shape, batches,
        non-numeric data): they all go the general way then. A window that reads no input or output
        (no baseline, no declared range, no float output; or histograms turned off) takes latencies only."""
        if not plan.tensors and not plan.numeric_outputs and plan.output is None and len(inputs) == 1:
            return LatencyCapture(next(iter(inputs)), on_full)
        tensors = plan.tensors or (frozenset(inputs) if len(inputs) == 1 else frozenset())  # no features: rows only
        tensor = next(iter(tensors)) if len(tensors) == 1 else None
        value = inputs.get(tensor) if tensor in plan.fixed_rows else None
        if tensor is None or not isinstance(value, np.ndarray) or not _numeric_batch_of_one(value):
            return None
        reads = {name: output for name in plan.numeric_outputs if isinstance(output := outputs.get(name), np.ndarray)}
        if len(reads) != len(plan.numeric_outputs) or not all(map(_numeric_batch_of_one, reads.values())):
            return None
        hist = plan.output
        label = hist.name if hist is not None and hist.categories else None
        if label is not None and (plan.decision is not None or getattr(outputs.get(label), "size", 0) != 1):
            scores = outputs.get(label)
            if not isinstance(scores, np.ndarray) or not _numeric_batch_of_one(scores):
                return None
            reads[label], label = scores, None  # class scores: the window decides their classes
        return cls(tensor, value.dtype, int(value.nbytes), reads, label, on_full)

    def add(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], latency_ms: float) -> bool:
        """Capture one answer; False (and nothing captured) when it does not fit.
        On the request path, without a lock (module docstring)."""
        try:
            value = inputs[self.tensor]
            row = value.tobytes()
            one = self.one_read
            if one is not None:
                read = outputs[one].tobytes()
            else:
                read = b"".join([o.tobytes() for o in self.many_reads(outputs)]) if self.many_reads is not None else b""
            label = outputs[self.label].item() if self.label is not None else None  # item(): one element only
        except (KeyError, AttributeError, TypeError, ValueError):
            return False  # a missing tensor, not an array, or a label of several elements
        if len(row) != self.row_nbytes or len(read) != self.reads_nbytes or value.dtype is not self.dtype:
            return False  # a batch, or another dtype
        answers = self.answers
        answers.append((row, read, label, latency_ms))
        if len(answers) >= BIN_EVERY_ANSWERS:
            self.on_full(self)
        return True

    def take(self) -> RoutineBatch | None:
        """The answers appended so far as one batch (None if there is none), removed from the capture.

        The caller holds the recorder's lock (takes do not race each other); appends racing with this one
        land after the prefix taken.
        """
        taken = _take_prefix(self.answers)
        if not taken:
            return None
        n = len(taken)
        rows, reads, labels, latencies = zip(*taken, strict=True)
        inputs = np.frombuffer(b"".join(rows), self.dtype).reshape(n, -1)
        dtype = self.reads_dtype
        outputs = np.frombuffer(b"".join(reads), dtype, count=n) if dtype.itemsize else np.empty(n, dtype)
        counted = Counter(labels) if self.label is not None else {}  # one C loop; categories looked up per label
        return RoutineBatch(self.tensor, inputs, outputs, counted, np.array(latencies, dtype=np.float64))


class LatencyCapture:
    """The routine answers of a window that reads no input or output: only their latency is kept
    (and their count). Lock-free like :class:`RoutineCapture`, one float per answer."""

    __slots__ = ("tensor", "latencies_ms", "on_full")

    def __init__(self, tensor: str, on_full: Callable[[LatencyCapture], None]) -> None:
        self.tensor, self.on_full = tensor, on_full
        self.latencies_ms: list[float] = []

    def add(self, inputs: Mapping[str, Any], _outputs: Mapping[str, Any], latency_ms: float) -> bool:
        """Capture one answer of one row; False (nothing captured) for a batch, counted the general way."""
        try:
            if len(inputs[self.tensor]) != 1:
                return False
        except (KeyError, TypeError):
            return False  # another tensor, or a 0-d value
        latencies = self.latencies_ms
        latencies.append(latency_ms)
        if len(latencies) >= BIN_EVERY_ANSWERS:
            self.on_full(self)
        return True

    def take(self) -> RoutineBatch | None:
        """The latencies appended so far as one batch of answers (see :meth:`RoutineCapture.take`)."""
        taken = _take_prefix(self.latencies_ms)
        if not taken:
            return None
        n = len(taken)
        nothing = np.empty((n, 0), dtype=np.float32)
        return RoutineBatch(self.tensor, nothing, np.empty(n, np.dtype([])), {}, np.array(taken, dtype=np.float64))


def _take_prefix(items: list[T]) -> list[T]:
    """The items a list holds now, removed from it. Two atomic steps (a slice, a deletion of that
    prefix), so what another thread appends meanwhile stays in the list, after the prefix."""
    n = len(items)
    taken = items[:n]
    del items[:n]
    return taken


def _numeric_batch_of_one(value: Any) -> bool:
    return type(value) is np.ndarray and value.ndim >= 1 and len(value) == 1 and value.dtype.kind in "biuf"


def never_fits(_inputs: Mapping[str, Any], _outputs: Mapping[str, Any], _latency_ms: float) -> bool:
    """The capture of a (model, version) whose routine answers do not fit :class:`RoutineCapture`."""
    return False

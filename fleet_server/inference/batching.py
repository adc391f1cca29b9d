"""Dynamic batching: requests to one model wait a little so that one model call answers many.

Flow: :meth:`DynamicBatcher.submit` refuses at once when the queue is full (``BusyError`` -> 429
with ``Retry-After``), else queues the request and waits for its answer, at most until its own
deadline (``DeadlineExceededError`` -> 504; a request whose deadline passes while it waits is dropped
from the queue and never run). One collector task per model waits for a free model thread (up to
``concurrency`` batches of one model run at once, as many as the endpoint has model threads), takes
the oldest request, waits until ``max_batch_size`` rows are queued, the oldest has waited
``max_queue_delay_us`` or no request came for a quarter of that, and runs the batch
(:meth:`ServedModel.run_batch`: the Predictor stacks the requests and calls the runtime once).
While batches run, the next one fills up, so under load the batches grow by themselves and the delay
only matters when the endpoint is idle. A batch that fails is retried one request at a time, so that
one bad request fails alone.

Where a batch runs: on a model thread, unless the model's calls take under ``INLINE_BELOW_S`` of CPU
(a moving average of the measured calls), in which case the collector runs it on the event loop. A
thread hop costs more than such a call: the pool thread must win the GIL from the busy event loop
(Python hands it over every 5 ms), and the loop must win it back; measured on the digits CNN at
concurrency 64, batches on the loop answered several times the requests per second of batches on a
thread. Long calls (a wide MLP) stay on threads, which run them in parallel with the loop.

:class:`DirectRunner` is the same interface without a queue (``max_batch_size`` 1, or batching off):
each request runs on the model threads as it comes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bundles.errors import BusyError, DeadlineExceededError
from fleet_server.inference.metrics import InferenceMetrics
from fleet_server.inference.models import ServedModel

Outputs = dict[str, np.ndarray]
INLINE_BELOW_S = 0.001
"""A model whose calls average under this runs its batches on the event loop (module docstring)."""


class Runner(Protocol):
    """Runs requests of one model (with or without batching)."""

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int, deadline: float | None) -> Outputs: ...

    async def close(self) -> None: ...


@dataclass
class _Waiting:
    inputs: Mapping[str, np.ndarray]
    rows: int
    deadline: float | None
    future: asyncio.Future[Outputs]
    queued_at: float = field(default_factory=time.monotonic)


class DirectRunner:
    """One model call per request, on the model threads."""

    def __init__(
        self, model: ServedModel, executor: concurrent.futures.Executor, metrics: InferenceMetrics, max_queue: int
    ) -> None:
        self.model, self.executor, self.metrics, self.max_queue = model, executor, metrics, max_queue
        self.in_flight = 0

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int, deadline: float | None) -> Outputs:
        if self.in_flight >= self.max_queue:
            raise BusyError(f"model '{self.model.name}' has {self.in_flight} requests in progress; retry shortly")
        self.metrics.batch_size.labels(self.model.name).observe(rows)
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        try:
            future = loop.run_in_executor(self.executor, self.model.run_batch, [inputs])
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            outputs = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceededError("the request's deadline passed before it was answered") from None
        finally:
            self.in_flight -= 1
        return outputs[0]

    async def close(self) -> None:
        return None


class DynamicBatcher:
    """The per-model queue and its collector (module docstring)."""

    def __init__(
        self,
        model: ServedModel,
        executor: concurrent.futures.Executor,
        metrics: InferenceMetrics,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue: int,
        concurrency: int = 1,
    ) -> None:
        self.model, self.executor, self.metrics = model, executor, metrics
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_delay_s = max_queue_delay_us / 1e6
        self.call_s: float | None = None
        """Moving average of the model's call time (None until the first call)."""
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._wake = asyncio.Event()
        self._free = asyncio.Semaphore(max(1, concurrency))
        self._running: set[asyncio.Task[None]] = set()
        self._batch_size = metrics.batch_size.labels(model.name)
        self._queue_time_s = metrics.queue_time_s.labels(model.name)
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{model.name}")

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def inline(self) -> bool:
        """Run batches on the event loop (the model's calls are shorter than a thread hop)."""
        return self.call_s is not None and self.call_s < INLINE_BELOW_S

    async def submit(self, inputs: Mapping[str, np.ndarray], rows: int, deadline: float | None) -> Outputs:
        if len(self._queue) >= self.max_queue:
            raise BusyError(f"model '{self.model.name}' has {len(self._queue)} requests waiting; retry shortly")
        waiting = _Waiting(inputs, rows, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        self._wake.set()
        if deadline is None:
            return await waiting.future
        try:
            return await asyncio.wait_for(asyncio.shield(waiting.future), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            waiting.future.cancel()  # still queued: the collector drops it; running: its answer is discarded
            raise DeadlineExceededError("the request's deadline passed while it waited in the queue") from None

    async def _collect(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._free.acquire()
            await self._fill()
            batch = self._take()
            if not batch:
                self._free.release()
            elif self.inline:
                await self._run(batch)
                self._free.release()
            else:
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._free.release()

    async def _fill(self) -> None:
        """Wait for more requests: until a full batch is queued, the oldest has waited the maximum delay, or
        none came for a quarter of it."""
        if not self._queue:
            return
        oldest = self._queue[0].queued_at
        gap_s = self.max_delay_s / 4
        while sum(w.rows for w in self._queue) < self.max_batch_size:
            left = oldest + self.max_delay_s - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(left, gap_s))
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Waiting]:
        """The oldest requests that fit ``max_batch_size`` rows (at least one), dropping abandoned ones."""
        batch: list[_Waiting] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            waiting = self._queue[0]
            if waiting.future.done():  # its deadline passed: never run it
                self._queue.popleft()
                continue
            if batch and rows + waiting.rows > self.max_batch_size:
                break
            self._queue.popleft()
            batch.append(waiting)
            rows += waiting.rows
            self._queue_time_s.observe(now - waiting.queued_at)
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        self._batch_size.observe(sum(w.rows for w in batch))
        requests = [w.inputs for w in batch]
        try:
            if self.inline:
                outputs = self._call(requests)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self._call, requests)
        except Exception as e:  # noqa: BLE001 - retried one by one so that only the bad request fails
            if len(batch) == 1:
                _settle(batch[0], None, e)
                return
            for waiting in batch:
                await self._run([waiting])
            return
        for waiting, answer in zip(batch, outputs, strict=True):
            _settle(waiting, answer, None)

    def _call(self, requests: list[Mapping[str, np.ndarray]]) -> list[Outputs]:
        """One model call, its CPU time averaged into :attr:`call_s`.

        CPU time of this thread, not wall time: on a pool thread the wall time includes the wait for
        the GIL that a busy event loop holds, which would keep a fast model off the loop for good.
        """
        started = time.thread_time()
        try:
            return self.model.run_batch(requests)
        finally:
            took = time.thread_time() - started
            self.call_s = took if self.call_s is None else 0.8 * self.call_s + 0.2 * took

    async def close(self) -> None:
        """Stop collecting; requests still queued are told the model went away."""
        self._task.cancel()
        for waiting in self._queue:
            if not waiting.future.done():
                waiting.future.set_exception(BusyError(f"model '{self.model.name}' was unloaded; retry"))
        self._queue.clear()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)  # batches already on a thread finish


def _settle(waiting: _Waiting, answer: Outputs | None, error: BaseException | None) -> None:
    if waiting.future.done():
        return
    if error is not None:
        waiting.future.set_exception(error)
    else:
        assert answer is not None
        waiting.future.set_result(answer)


def make_runner(model: ServedModel, executor: Any, metrics: InferenceMetrics, settings: Any) -> Runner:
    """A batcher with the bundle's hints (else the settings), or a direct runner when batching is off."""
    size = model.max_batch_size or settings.max_batch_size
    delay = model.max_queue_delay_us if model.max_queue_delay_us is not None else settings.max_queue_delay_us
    if not settings.batching or size <= 1:
        return DirectRunner(model, executor, metrics, settings.max_queue)
    return DynamicBatcher(model, executor, metrics, size, delay, settings.max_queue, settings.threads)

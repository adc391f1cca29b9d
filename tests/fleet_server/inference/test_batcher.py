"""Where batches run: a fast model's on the event loop, a slow model's on the model threads, in parallel.

The batcher is driven directly with a stand-in model that records where and how often it runs (the
real Predictor behind it is exercised by the endpoint tests); only the scheduling is under test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from bundles.errors import InputError
from fleet_server.inference.batching import DynamicBatcher
from fleet_server.inference.metrics import InferenceMetrics


def _burn_cpu(seconds: float) -> None:
    """Work for ``seconds`` of this thread's CPU time (numpy releases the GIL, as a runtime does)."""
    a = np.ones((128, 128), np.float32)
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        a = np.tanh(a @ a)


class RecordingModel:
    """Doubles its input; works ``call_s`` of CPU a call; remembers the calling threads and the overlap."""

    name, version, kind, memory_bytes = "stand-in", 1, "test", 0
    max_batch_size, max_queue_delay_us = None, None

    def __init__(self, call_s: float) -> None:
        self.call_s = call_s
        self.threads: list[int] = []
        self.running = self.most_running = 0
        self._lock = threading.Lock()

    def run_batch(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        with self._lock:
            self.threads.append(threading.get_ident())
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if any(float(r["x"][0, 0]) < 0 for r in requests):
                raise InputError("negative rows are refused")
            if self.call_s:
                _burn_cpu(self.call_s)
            return [{"y": r["x"] * 2} for r in requests]
        finally:
            with self._lock:
                self.running -= 1


async def _answer_all(model: RecordingModel, values: list[float], concurrency: int = 2) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        batcher = DynamicBatcher(model, pool, InferenceMetrics(), 4, 1000, 256, concurrency)  # type: ignore[arg-type]
        try:
            calls = [batcher.submit({"x": np.full((1, 1), v, np.float32)}, 1, None) for v in values]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await batcher.close()


def test_a_fast_models_batches_move_to_the_event_loop_and_stay_there() -> None:
    """The first call is timed on a model thread; once the average says "fast", every batch runs on the loop.

    How many calls that takes depends on the first call's CPU time (a cold first call on a loaded host can
    take a few milliseconds, which the moving average forgets within some calls), so the test sends enough
    batches for the average to settle and checks the move happens once and for good.
    """
    model = RecordingModel(call_s=0.0)
    loop_thread = threading.get_ident()
    values = [float(v) for v in range(80)]
    answers = asyncio.run(_answer_all(model, values, concurrency=1))
    assert [float(a["y"][0, 0]) for a in answers] == [2.0 * v for v in values]
    assert len(model.threads) >= 20  # at most 4 rows a batch
    assert model.threads[0] != loop_thread  # the first call is timed on a model thread
    assert loop_thread in model.threads, "a model whose calls take microseconds never reached the event loop"
    moved_at = model.threads.index(loop_thread)
    assert set(model.threads[moved_at:]) == {loop_thread}  # once on the loop, later batches never left it


def test_a_slow_models_batches_run_on_the_model_threads_in_parallel() -> None:
    model = RecordingModel(call_s=0.03)
    answers = asyncio.run(_answer_all(model, [float(v) for v in range(16)]))
    assert [float(a["y"][0, 0]) for a in answers] == [2.0 * v for v in range(16)]
    assert threading.get_ident() not in model.threads
    assert model.most_running == 2  # two batches of one model at once: both model threads busy


@pytest.mark.parametrize("call_s", [0.0, 0.01])
def test_a_failing_batch_is_retried_one_by_one_so_only_the_bad_request_fails(call_s: float) -> None:
    model = RecordingModel(call_s=call_s)

    answers = asyncio.run(_answer_all(model, [1.0, -1.0, 2.0, 3.0, 4.0, -2.0, 5.0, 6.0], concurrency=1))
    assert isinstance(answers[1], InputError) and isinstance(answers[5], InputError)
    assert [float(answers[i]["y"][0, 0]) for i in (0, 2, 3, 4, 6, 7)] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]

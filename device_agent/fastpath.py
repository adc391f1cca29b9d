"""Fast inference requests on the HTTP server's I/O thread; the rest on its worker threads.

waitress reads every connection on one I/O thread and hands each complete request to a worker thread.
For a model that answers in tens of microseconds that hand-off is most of the cost: the worker and the
I/O thread pass the GIL back and forth (every socket call, every ONNX Runtime call releases it), and at
concurrency 64 they queue behind each other for it (a convoy: the agent answered about a tenth of what
the same stack answers with a fixed response). The cloud endpoint's batcher met the same thing and
runs a fast model on its event loop (ADR 0007); this module does the same for the agent's API.

The decision is per route (the request path: a model, or a model at a version), from measurements:

1. A route starts on the workers, which measure each request's thread CPU time.
2. Once the median CPU time of its last ``warm_up_runs`` requests is at most ``fast_cpu_s`` (a median:
   the first, cold request of a model costs many times the rest), its requests of at
   most ``max_body_bytes`` run on the I/O thread, after the loop iteration that read them (never inside
   waitress's ``received``, which holds the channel's lock) and only while the engine has a free slot
   (an inline request never waits for admission).
3. The CPU median keeps deciding, inline requests included: a model that got heavier goes back to the
   workers with its next request. On the I/O thread the wall time is measured too: a route whose last
   inline requests' median is over ``max_inline_wall_s`` (it waits on something: a lock, a sleep,
   another thread), or one of whose requests took over ``stall_wall_s``, goes back to the workers for
   ``cooldown_s``. So does a route whose answer involved the fallback chain (a cloud call can wait on
   the network): :meth:`FastPath.blocked`, called by the application. A route whose answer was computed
   on the serving pipeline's deadline thread while this one waited is measured again from scratch
   (:meth:`FastPath.remeasure`): it earns the lane once the pipeline runs the model inline.

   The wall limit is generous (20 ms) on purpose: an inline request also waits for the GIL while
   another of the agent's threads holds it, and for a core while another process runs. Neither is the
   route's doing, and the workers suffer both worse: right after a route moves inline, the workers
   still drain its queue and its first inline requests wait a few milliseconds each for the GIL. A
   2 ms wall limit sent routes back for exactly that, to workers that at concurrency 64 spent 4 to 35
   times more CPU per answer than the lane, convoying on the GIL (ADR 0012).

When one loop pass holds several inline requests of a route, they are answered together: the
application's ``prepare`` hook (``OipApp.prepare_together``) decodes each, answers them with one model call
(dynamic batching, ``ServingPipeline.predict_together``) and leaves each answer, or its own error, in the
request's WSGI environ. That environ is built ahead by :func:`prepared_environ` with the task that will
serve the request, which :func:`prepared_task_factory` gives back when its turn comes; waitress then
serves each request as usual, and the application sends the answer it finds. The requests of a route
served in one pass are measured once, as one observation of each one's share.

Everything else (language-model routes, health and metadata, large bodies) always goes to the workers.
The measure is the route's, not the request's: a slow request on a fast route delays the requests read
in the same loop iteration by its own time; a few of them (four, or one over ``stall_wall_s``) send the
route back to the workers.
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from waitress import wasyncore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastPathSettings:
    """When a route may run on the I/O thread (``[http]`` ``inline_*`` in agent.toml, see docs/agent.md)."""

    enabled: bool = True
    fast_cpu_s: float = 0.001
    warm_up_runs: int = 8
    max_body_bytes: int = 64 * 1024
    max_inline_wall_s: float = 0.020
    stall_wall_s: float = 1.0
    cooldown_s: float = 60.0


@dataclass
class _RouteStats:
    cpu_s: collections.deque[float]  # the last requests' thread CPU times (their median decides)
    inline_wall_s: collections.deque[float]  # the last inline requests' wall times (their median decides)
    demoted_until: float = -math.inf

    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s)


_MIN_INLINE_RUNS = 4
_NEVER_BYTES = 1 << 62  # a send_bytes that buffers every write (the poll phase sends it)


class FastPath:
    """Which inference routes run on the I/O thread, from their measured cost (thread-safe)."""

    def __init__(self, settings: FastPathSettings, has_room: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        """``has_room``: whether a request would be admitted by the engine now, without waiting."""
        self.settings, self.has_room, self.clock = settings, has_room, clock
        self._routes: dict[str, _RouteStats] = {}
        self._lock = threading.Lock()

    @staticmethod
    def route(method: str, path: str) -> str | None:
        """The route an inference request is measured under (None: not an inference request)."""
        if method == "POST" and path.startswith("/v2/models/") and path.rstrip("/").endswith("/infer"):
            return path.rstrip("/")
        return None

    def fast(self, route: str, body_bytes: int) -> bool:
        """Whether a request of ``body_bytes`` on ``route`` may run on the I/O thread now."""
        stats = self._routes.get(route)
        cfg = self.settings
        return (
            cfg.enabled and stats is not None and body_bytes <= cfg.max_body_bytes
            and len(stats.cpu_s) >= cfg.warm_up_runs and stats.median_cpu_s() <= cfg.fast_cpu_s
            and self.clock() >= stats.demoted_until and self.has_room()
        )  # fmt: skip

    def observe(self, route: str, cpu_s: float, wall_s: float, inline: bool, group_wall_s: float | None = None) -> None:
        """Record one served request, or a group of inline requests served in one loop pass as one observation
        of each one's share (``wall_s`` counts only on the I/O thread: a worker's includes GIL waits).
        ``group_wall_s``: how long the group held the I/O thread, which the stall limit applies to."""
        with self._lock:
            stats = self._stats(route)
            stats.cpu_s.append(cpu_s)
            if not inline:
                return
            stats.inline_wall_s.append(wall_s)
            typical_s = statistics.median_low(stats.inline_wall_s)
            slow = len(stats.inline_wall_s) >= _MIN_INLINE_RUNS and typical_s > self.settings.max_inline_wall_s
            held_s = wall_s if group_wall_s is None else group_wall_s
            if slow or held_s > self.settings.stall_wall_s:
                self._demote(route, stats, f"inline requests took {typical_s * 1e3:.1f} ms (median; "
                                           f"this one {held_s * 1e3:.1f} ms)")  # fmt: skip

    def blocked(self, route: str) -> None:
        """The route's last answer involved the fallback chain: it may wait on the network, so not inline."""
        with self._lock:
            stats = self._stats(route)
            if self.clock() >= stats.demoted_until:
                self._demote(route, stats, "its answer involved the fallback chain")

    def remeasure(self, route: str) -> None:
        """Forget the route's measurements (no cooldown): it runs on the workers until ``warm_up_runs`` fresh
        requests measure it fast again. For a wait that ends on its own (the deadline thread, until the
        serving pipeline lets the model run inline)."""
        with self._lock:
            stats = self._stats(route)
            stats.cpu_s.clear()
            stats.inline_wall_s.clear()

    def _stats(self, route: str) -> _RouteStats:
        stats = self._routes.get(route)
        if stats is None:
            runs = self.settings.warm_up_runs
            stats = self._routes[route] = _RouteStats(collections.deque(maxlen=runs), collections.deque(maxlen=runs))
        return stats

    def _demote(self, route: str, stats: _RouteStats, why: str) -> None:
        stats.demoted_until = self.clock() + self.settings.cooldown_s
        stats.inline_wall_s.clear()
        stats.cpu_s.clear()
        log.info("http: %s runs on worker threads for %.0f s: %s", route, self.settings.cooldown_s, why)


class FastPathDispatcher:
    """waitress's task dispatcher with a fast lane: fast requests are kept for the I/O thread, which
    runs them (:meth:`run_pending`) after each loop iteration; the others go to ``workers``, measured.

    When one :meth:`run_pending` serves several requests, an inline answer is not sent as it is written:
    it stays in its channel's buffer until all of them are computed, and they are sent together at its
    end (a request alone is sent at once: deferring it measured 20 % more CPU at concurrency 1). ``adjustments``
    (the server's waitress settings) are copied with ``send_bytes`` raised for the inline requests only;
    workers keep sending at once, which a streamed answer needs. Measured at concurrency 64 with the
    digits-sized model: about 140 instead of 175 µs of server CPU per JSON answer, and 40 instead of
    50 µs for the fixed answer (ADR 0012).
    """

    def __init__(
        self, workers: Any, fast_path: FastPath, adjustments: Any = None,
        prepare: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:  # fmt: skip
        """``prepare``: computes the answers of several requests of one route at once (dynamic batching), each
        left in its WSGI environ for the application to send (``OipApp.prepare_together``)."""
        self.workers, self.fast_path, self.prepare = workers, fast_path, prepare
        self.deferred_adjustments = None if adjustments is None else copy.copy(adjustments)
        if self.deferred_adjustments is not None:
            self.deferred_adjustments.send_bytes = _NEVER_BYTES
        self.io_thread: int | None = None  # set by the loop's thread when it starts
        self._pending: collections.deque[tuple[Any, str]] = collections.deque()

    def add_task(self, channel: Any) -> None:
        """waitress's hook: ``channel`` has a complete request to serve (called with the channel's lock held)."""
        request = channel.requests[0]
        route = None if request.error else self.fast_path.route(request.command, request.path)
        if route is not None and threading.get_ident() == self.io_thread:
            if self.fast_path.fast(route, request.content_length):
                self._pending.append((channel, route))
                return
        self.workers.add_task(_MeasuredTask(channel, route, self.fast_path))

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def run_pending(self) -> None:
        """Serve the requests kept for the I/O thread (those read before this call; later ones wait a turn),
        then send their answers.

        A request alone is served and sent at once, measured alone. Several are served route by route: a
        route's requests are answered together (``prepare``) when there are several, their answers sent at
        the end, and the route measured once for them all (each request's share of the CPU and wall time;
        the whole group's wall time for the stall limit): two clock reads per route instead of per request.
        """
        if len(self._pending) == 1:  # deferring a lone answer costs it a pass
            channel, route = self._pending.popleft()
            if self.fast_path.has_room():
                _serve_measured(channel, route, self.fast_path, inline=True)
            else:
                self.workers.add_task(_MeasuredTask(channel, route, self.fast_path))
            return
        by_route: dict[str, list[Any]] = {}
        while self._pending:
            channel, route = self._pending.popleft()
            by_route.setdefault(route, []).append(channel)
        served: list[Any] = []
        for route, channels in by_route.items():
            self._serve_route(route, channels, served)
        for channel in served:
            if channel.total_outbufs_len:
                wasyncore.write(channel)  # as the poll would on a writable socket (errors: the channel's handle_error)

    def _serve_route(self, route: str, channels: list[Any], served: list[Any]) -> None:
        """Serve one route's pending requests on this thread, their answers left in their channels' buffers
        (appended to ``served``); answered together when there are several; measured once for them all."""
        wall_began, cpu_began = time.perf_counter(), time.thread_time()
        if len(channels) > 1 and self.prepare is not None and self.fast_path.has_room():
            environs: list[dict[str, Any]] = []
            try:
                environs += (prepared_environ(channel) for channel in channels)
                self.prepare(environs)
            except Exception:  # a bug: each request is then served alone, from its body again
                log.exception("http: unexpected error answering %d requests of %s together", len(channels), route)
                _unprepare(environs)
        inline = 0
        for channel in channels:
            if not self.fast_path.has_room():  # the engine filled up meanwhile: a worker may wait, this thread not
                self.workers.add_task(_MeasuredTask(channel, route, self.fast_path))
                continue
            self._serve_deferred(channel, route)
            served.append(channel)
            inline += 1
        if inline:
            cpu_s, wall_s = time.thread_time() - cpu_began, time.perf_counter() - wall_began
            self.fast_path.observe(route, cpu_s / inline, wall_s / inline, inline=True, group_wall_s=wall_s)

    def _serve_deferred(self, channel: Any, route: str) -> None:
        """One request on this (the I/O) thread, its answer left in the channel's buffer (not measured)."""
        adjustments = channel.adj
        if self.deferred_adjustments is not None:
            channel.adj = self.deferred_adjustments  # only this thread holds the channel now
        try:
            channel.service()
        except Exception:  # waitress's own worker loop logs and goes on; so does the I/O thread
            log.exception("http: unexpected error serving %s", route)
        finally:
            channel.adj = adjustments

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        while self._pending:
            self._pending.popleft()[0].cancel()
        return bool(self.workers.shutdown(cancel_pending=cancel_pending, timeout=timeout))


class _MeasuredTask:
    """A channel's request for a worker thread, its CPU time recorded for its route."""

    def __init__(self, channel: Any, route: str | None, fast_path: FastPath) -> None:
        self.channel, self.route, self.fast_path = channel, route, fast_path

    def service(self) -> None:
        _serve_measured(self.channel, self.route, self.fast_path, inline=False)

    def cancel(self) -> None:
        self.channel.cancel()


PREPARED_ANSWER = "edgefleet.prepared"
"""The WSGI environ key of an answer computed ahead of its request's turn (``OipApp.prepare_together``)."""
PREPARED_TASK = "edgefleet_task"
"""The attribute of a waitress request that holds the task built ahead of its turn (:func:`prepared_environ`)."""


def _serve_measured(channel: Any, route: str | None, fast_path: FastPath, inline: bool) -> None:
    """Serve the channel's request, its CPU and wall time measured for its route."""
    if route is None:
        channel.service()
        return
    wall_began, cpu_began = time.perf_counter(), time.thread_time()
    try:
        channel.service()
    except Exception:  # waitress's own worker loop logs and goes on; so does the I/O thread
        log.exception("http: unexpected error serving %s", route)
    fast_path.observe(route, time.thread_time() - cpu_began, time.perf_counter() - wall_began, inline)


def prepared_environ(channel: Any) -> dict[str, Any]:
    """The WSGI environ of the channel's request, built now by the task that will serve it (as waitress would
    build it), the task kept on the request, where :func:`prepared_task_factory` finds it when its turn comes."""
    request = channel.requests[0]
    task = channel.task_class(channel, request)
    environ: dict[str, Any] = task.get_environment()
    setattr(request, PREPARED_TASK, task)
    return environ


def _unprepare(environs: list[dict[str, Any]]) -> None:
    """Forget what a failed prepare call left: the requests are read and answered again, one by one."""
    for environ in environs:
        environ.pop(PREPARED_ANSWER, None)
        environ["wsgi.input"].seek(0)


def prepared_task_factory(base: type) -> Callable[[Any, Any], Any]:
    """waitress's task class as a channel calls it (``task_class(channel, request)``), giving back the task
    :func:`prepared_environ` built for the request, if any (its environ then holds the answer)."""

    def task_for(channel: Any, request: Any) -> Any:
        prepared = getattr(request, PREPARED_TASK, None)
        return prepared if prepared is not None else base(channel, request)

    return task_for

"""The recorder: sees every answer of the serving pipeline and turns it into telemetry.

Flow: :meth:`TelemetryRecorder.record` (on the request path, under one lock) counts the request in
the current window of its (model, version) and offers it to that window's sampler. Routine answers
(local, no fallback: most requests) take :meth:`TelemetryRecorder.record_local` instead, which needs
no lock: it captures the answer into its (model, version)'s ``RoutineCapture``
(``device_agent.telemetry.capture``) and decrements the sampling countdown. When the wall-clock window
ends (windows are aligned to multiples of ``window_s`` so that devices' windows line up),
:meth:`TelemetryRecorder.tick` bins what the captures hold, closes every open window and writes the
window payloads and the kept samples into the offline buffer in one transaction. Events (installs,
heartbeats, breaker changes) go straight to the buffer. The uploader drains the buffer.

With :meth:`TelemetryRecorder.start` (the agent does it) a background thread does the numpy work
the request path used to do: it bins the captured answers every ``bin_interval_s`` (and at once when
a capture holds 4,096 answers or 256 general ones are pending), closes windows on time even without
traffic, and every ``checkpoint_interval_s`` writes each open window, as it would close now, to the
buffer's ``checkpoints`` table. A window that closes normally replaces its checkpoint in the same
transaction; one whose process died (power cut, ``kill -9``) is queued from its checkpoint at the next
start, so at most ``checkpoint_interval_s`` of answers are lost.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import math
import os
import random
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundles.errors import ConfigError
from bundles.manifest import Manifest
from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.capture import LatencyCapture, RoutineCapture, never_fits
from device_agent.telemetry.events import heartbeat_event, install_event, make_event
from device_agent.telemetry.sampling import MAX_LOGGED_VALUES, Candidate, WindowSampler
from device_agent.telemetry.windows import COUNTERS_ONLY, BinPlan, WindowAccumulator, compile_plan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TelemetrySettings:
    """Telemetry knobs; the server can change the first four through the desired state.

    The defaults fit two weeks offline at 1 request/s in 50 MB (``docs/telemetry.md`` has the
    arithmetic and ``tests/device_agent/telemetry/test_buffer.py`` the proof).
    """

    window_s: float = 60.0
    sample_rate: float = 0.01
    reservoir_size: int = 20
    upload_interval_s: float = 60.0
    max_forced_per_window: int = 20
    buffer_cap_bytes: int = 50_000_000
    batch_max_items: int = 500
    batch_max_bytes: int = 1_000_000
    histograms: bool = True  # False: counters and the latency histogram only (no input/output distributions)
    max_sample_values: int = MAX_LOGGED_VALUES
    checkpoint_interval_s: float = 5.0  # open windows saved this often: what a power cut can lose
    bin_interval_s: float = 1.0  # the binning thread's period (it also wakes when a capture is full)

    def __post_init__(self) -> None:
        if self.window_s <= 0 or not 0.0 <= self.sample_rate <= 1.0 or self.reservoir_size < 0:
            raise ConfigError(f"telemetry settings out of range: {self}")
        if not 0 < self.checkpoint_interval_s <= 3600 or not 0 < self.bin_interval_s <= 60:
            raise ConfigError(f"telemetry settings out of range: {self}")

    def with_desired(self, section: Mapping[str, Any] | None) -> TelemetrySettings:
        """These settings updated by the desired state's ``telemetry`` section (unknown keys ignored)."""
        if not section:
            return self
        known = {"window_s": float, "sample_rate": float, "reservoir_size": int, "upload_interval_s": float}
        changes = {key: kind(section[key]) for key, kind in known.items() if section.get(key) is not None}
        return dataclasses.replace(self, **changes)


class _OpenWindow:
    """The accumulator and sampler of one (model, version) in the current window."""

    __slots__ = ("model", "manifest", "accumulator", "sampler")

    def __init__(self, model: str, manifest: Manifest | None, accumulator: WindowAccumulator, sampler: WindowSampler):
        self.model, self.manifest, self.accumulator, self.sampler = model, manifest, accumulator, sampler


class _Route:
    """What the routine path needs for one (model, version), read per request without the lock: the capture
    (kept across windows, see ``device_agent.telemetry.capture``) and the current window's sampler."""

    __slots__ = ("model", "manifest", "version", "capture", "captured", "sampler")

    def __init__(self, model: str, manifest: Manifest | None, version: int, sampler: WindowSampler) -> None:
        self.model, self.manifest, self.version, self.sampler = model, manifest, version, sampler
        self.captured: RoutineCapture | LatencyCapture | None = None  # shaped on the first routine answer
        self.capture: Callable[[Mapping[str, Any], Mapping[str, Any], float], bool] = never_fits


class TelemetryRecorder:
    """Counts, samples and buffers; see the module docstring. Thread-safe."""

    def __init__(
        self,
        buffer: TelemetryBuffer,
        settings: TelemetrySettings | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.buffer = buffer
        self.settings = settings or TelemetrySettings()
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - sampling, not security
        self._lock = threading.Lock()
        self._plans: dict[tuple[str, int], BinPlan] = {}
        self._open: dict[tuple[str, int], _OpenWindow] = {}
        self._routes: dict[tuple[str, int], _Route] = {}
        self._retired: list[_Route] = []  # routes replaced when histograms were turned on/off
        self._current: dict[str, _Route] = {}  # by model: the routes of record_local valid for the current window
        self._window_start, self._window_end = self._bounds(clock())
        self.owner = f"{process_identity()}:{uuid.uuid4().hex[:8]}"  # whose checkpoints, in a shared buffer
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._checkpointed_at = 0.0
        self.recovered = buffer.recover_checkpoints(_owner_alive)

    # --- the binning and checkpointing thread -------------------------------------------------------

    def start(self) -> TelemetryRecorder:
        """Run binning, window closing and checkpoints on a background thread (see the module docstring)."""
        if self._worker is None:
            self._stop.clear()
            self._worker = threading.Thread(target=self._run, name="edgefleet-telemetry", daemon=True)
            self._worker.start()
        return self

    def stop(self) -> None:
        """Stop the background thread (the open windows stay open: :meth:`flush` closes them)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            self._stop.set()
            self._wake.set()
            worker.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.bin_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.maintain()
            except Exception as e:  # noqa: BLE001 - telemetry must never stop; the next pass retries
                logger.warning("telemetry pass failed: %s", e)

    def maintain(self, now: float | None = None) -> None:
        """One pass of the background thread: close ended windows, bin what is captured, checkpoint if due."""
        now = self.clock() if now is None else now
        self.tick(now)
        with self._lock:
            self._bin_everything()
        if now - self._checkpointed_at >= self.settings.checkpoint_interval_s:
            self.checkpoint(now)

    def checkpoint(self, now: float | None = None) -> int:
        """Save every open window as it would close now; how many were saved."""
        with self._lock:
            self._bin_everything()
            texts = {f"{model}:{version}": _window_json(window) for (model, version), window in self._open.items()}
        bodies = {key: zlib.compress(text, 6) for key, text in texts.items() if text is not None}
        self.buffer.checkpoint(self.owner, bodies)
        self._checkpointed_at = self.clock() if now is None else now
        return len(bodies)

    def _bin_everything(self) -> None:
        """Bin the captures and every open window's pending requests (under the lock)."""
        for route in [*self._retired, *self._routes.values()]:
            self._bin_into_window(route)
        for window in self._open.values():
            window.accumulator.bin_pending()

    def _full(self) -> bool:
        """A window's pending list is full: wake the binning thread; False (bin it yourself) if none runs.
        Called under the lock."""
        if self._worker is None:
            return False
        self._wake.set()
        return True

    @property
    def settings(self) -> TelemetrySettings:
        return self._settings

    @settings.setter
    def settings(self, value: TelemetrySettings) -> None:
        """New settings (from the desired state) apply to the next windows (histograms: to the answers
        from now on).

        A shorter window length also ends the current window at the next boundary of the new length
        (the server asks for short windows to watch a rollout closely: the first one should not wait
        out the old length). Later windows align to multiples of the new length, like every device's.
        """
        previous = getattr(self, "_settings", None)
        self._settings = value
        self._histograms = value.histograms
        if previous is not None and value.histograms != previous.histograms:
            with self._lock:  # a window has distributions or not: the open ones end here
                closing = self._close_windows(self.clock())
                # captures are shaped on what a window reads: new ones from now on; the old ones are binned
                # once more at the next close, for an answer that raced with this change
                self._retired, self._routes = list(self._routes.values()), {}
            self._buffer_windows(closing)
        if previous is not None and value.window_s < previous.window_s:
            with self._lock:
                self._window_end = min(self._window_end, self._bounds(self.clock())[1])
                for window in self._open.values():
                    window.accumulator.end = _utc(self._window_end)

    def _bounds(self, now: float) -> tuple[float, float]:
        start = math.floor(now / self.settings.window_s) * self.settings.window_s
        return start, start + self.settings.window_s

    def record(
        self,
        model: str,
        manifest: Manifest | None,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
        source: str | None,
        latency_ms: float,
        fallback_reason: str | None = None,
        error: str | None = None,
        confidence: float | None = None,
        low_confidence: bool = False,
        inputs_private: bool = False,
    ) -> None:
        """Count one answer (``source`` None means the request failed) and maybe keep it as a sample.

        The routine case (a local answer, no fallback) is: a clock read, one lock round trip, an
        append to the window's pending list and a countdown decrement (the sampling trial); everything
        else is batched.
        ``inputs_private`` says the arrays are the caller's private copy (kept without copying again).
        """
        now = self.clock()
        if now >= self._window_end:
            self.tick(now)
        version = manifest.version if manifest is not None else 0
        routine = source == "local" and fallback_reason is None
        lock = self._lock
        lock.acquire()  # not ``with``: acquire/release in try/finally costs half as much per request
        try:
            window = self._window_of(model, version, manifest)
            window.accumulator.observe(inputs, outputs, source, latency_ms, fallback_reason, inputs_private)
            sampler = window.sampler
            if routine and not sampler.draw():
                return  # the common case: counted, not sampled
            reason = None if routine else _forced_reason(source, fallback_reason, low_confidence)
            slot = sampler.slot_for(reason, drawn=routine)
            if slot is not None:
                reservoir, index = slot
                candidate = Candidate(
                    now, model, version, reason or "rate", {k: np.array(v) for k, v in inputs.items()},
                    dict(outputs or {}), source, latency_ms, fallback_reason, error, confidence,
                )  # fmt: skip
                reservoir.put(index, candidate)
        finally:
            lock.release()

    def record_local(
        self, model: str, manifest: Manifest | None, inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray], latency_ms: float, confidence: float | None = None,
    ) -> None:  # fmt: skip
        """:meth:`record` for the routine case, which is most requests: a local answer, no fallback, no
        error. The same effect (``tests/device_agent/telemetry/test_recorder.py`` checks that both ways
        record the same) in far fewer steps, and without the lock: the answer is captured as bytes while
        it is hot (``device_agent.telemetry.capture``). ``inputs`` and ``outputs`` are read before this
        returns and not kept, so the caller needs no private copy.

        Without the lock, two threads decrementing the sampling countdown at once can lose a decrement
        (a sample drawn one request later); counts are never lost.
        """
        now = self.clock()
        if now >= self._window_end:
            self.tick(now)
        route = self._current.get(model)
        if route is None or route.manifest is not manifest:
            route = self._route_for(model, manifest, inputs, outputs)
        if not route.capture(inputs, outputs, latency_ms):
            self._observe_unfit(route, inputs, outputs, latency_ms)
        sampler = route.sampler
        sampler.countdown -= 1  # WindowSampler.draw, inlined
        if sampler.countdown > 0:
            return  # counted, not sampled
        self._sample_routine(route, now, inputs, outputs, latency_ms, confidence)

    def _route_for(
        self, model: str, manifest: Manifest | None, inputs: Mapping[str, Any], outputs: Mapping[str, Any]
    ) -> _Route:
        """The route of (model, manifest's version) for the current window, remembered for the next request.

        A route's capture is shaped on its first routine answer (``RoutineCapture.fitting``).
        """
        version = manifest.version if manifest is not None else 0
        with self._lock:
            key = (model, version)
            window = self._window_of(model, version, manifest)
            route = self._routes.get(key)
            if route is None:
                route = self._routes[key] = _Route(model, manifest, version, window.sampler)
                on_full = functools.partial(self._on_full, route)
                route.captured = RoutineCapture.fitting(window.accumulator.plan, inputs, outputs, on_full)
                route.capture = route.captured.add if route.captured is not None else never_fits
            route.manifest, route.sampler = manifest, window.sampler  # the same version's bundle, reloaded
            self._current[model] = route
        return route

    def _on_full(self, route: _Route, _captured: RoutineCapture | LatencyCapture) -> None:
        """A route's capture holds ``BIN_EVERY_ANSWERS`` answers: the binning thread takes them (or, when
        it does not run, they are binned here, on the request path)."""
        if self._worker is not None:
            if not self._wake.is_set():  # every answer past the mark calls this until the thread takes them
                self._wake.set()  # (a Condition round trip: a few µs on every one of them)
        else:
            with self._lock:
                self._bin_into_window(route)

    def _bin_into_window(self, route: _Route) -> None:
        """Bin a route's captured answers into its window of the moment (under the lock)."""
        batch = route.captured.take() if route.captured is not None else None
        if batch is not None:
            window = self._window_of(route.model, route.version, route.manifest)
            window.accumulator.bin_routine(batch)

    def _observe_unfit(
        self, route: _Route, inputs: Mapping[str, Any], outputs: Mapping[str, Any], latency_ms: float
    ) -> None:
        """A routine answer its capture cannot take (a batch, another dtype): counted the general way."""
        with self._lock:
            window = self._window_of(route.model, route.version, route.manifest)
            window.accumulator.observe(inputs, outputs, "local", latency_ms, None)

    def _sample_routine(
        self, route: _Route, now: float, inputs: Mapping[str, Any], outputs: Mapping[str, Any],
        latency_ms: float, confidence: float | None,
    ) -> None:  # fmt: skip
        """The routine answer won its Bernoulli trial: offer it to the reservoir of its window's sampler."""
        with self._lock:
            sampler = route.sampler
            sampler.countdown = sampler.gap()
            slot = sampler.slot_for(None, drawn=True)
            if slot is not None:
                copied = {k: np.array(v) for k, v in inputs.items()}
                candidate = Candidate(
                    now, route.model, route.version, "rate", copied, dict(outputs), "local", latency_ms,
                    None, None, confidence,
                )  # fmt: skip
                slot[0].put(slot[1], candidate)

    def record_generation(self, model: str, manifest: Manifest | None, prompt_tokens: int, completion_tokens: int,
                          stop_reason: str, ttft_ms: float | None, tokens_per_s: float | None) -> None:  # fmt: skip
        """Add one language-model generation's figures to its window (the request itself goes through ``record``)."""
        now = self.clock()
        if now >= self._window_end:
            self.tick(now)
        version = manifest.version if manifest is not None else 0
        with self._lock:
            window = self._window_of(model, version, manifest)
            window.accumulator.observe_generation(prompt_tokens, completion_tokens, stop_reason, ttft_ms, tokens_per_s)

    def record_shadow(
        self, model: str, shadow_manifest: Manifest, agreed: bool, latency_ms: float | None = None, error: bool = False
    ) -> None:
        """Count one shadow comparison: the candidate version ran on a request and agreed (or not)
        with the active version's answer. Counted in the candidate's window (``shadow``: compared,
        agreed, errors, latency_ms_sum), which the server reads as the cohort's shadow agreement."""
        with self._lock:
            window = self._window_of(model, shadow_manifest.version, shadow_manifest)
            shadow = window.accumulator.shadow
            shadow["compared"] += 1
            shadow["agreed"] += int(agreed)
            shadow["errors"] += int(error)
            shadow["latency_ms_sum"] += 0.0 if latency_ms is None else round(latency_ms, 4)

    def _window_of(self, model: str, version: int, manifest: Manifest | None) -> _OpenWindow:
        """The open window of (model, version), opened now if it has none (under the lock)."""
        found = self._open.get((model, version))
        if found is not None:
            return found
        plan = self._plans.get((model, version))
        if plan is None:
            plan = self._plans[(model, version)] = compile_plan(manifest)
        if not self._histograms:
            plan = COUNTERS_ONLY  # counters and the latency histogram (rollout gates read them), no distributions
        start, end = _utc(self._window_start), _utc(self._window_end)
        settings = self.settings
        window = _OpenWindow(
            model,
            manifest,
            WindowAccumulator(model, version, plan, start, end, on_full=self._full),
            WindowSampler(
                settings.sample_rate,
                settings.reservoir_size,
                settings.max_forced_per_window,
                self.rng,
                settings.max_sample_values,
            ),  # fmt: skip
        )
        self._open[(model, version)] = window
        return window

    def tick(self, now: float | None = None, force: bool = False) -> int:
        """Close the windows if their time is over (or ``force``); returns how many items were buffered."""
        now = self.clock() if now is None else now
        with self._lock:
            if not force and now < self._window_end:
                return 0
            closing = self._close_windows(now)
        return self._buffer_windows(closing)

    def _close_windows(self, now: float) -> dict[tuple[str, int], _OpenWindow]:
        """End the open windows (under the lock) and start the ones of ``now``; the ended ones."""
        for route in [*self._retired, *self._routes.values()]:  # captured so far: the closing window's
            self._bin_into_window(route)
        self._retired = []
        closing, self._open, self._current = self._open, {}, {}
        self._window_start, self._window_end = self._bounds(now)
        return closing

    def _buffer_windows(self, closing: Mapping[tuple[str, int], _OpenWindow]) -> int:
        """Buffer the payloads (and samples) of ended windows, replacing their checkpoints; how many items."""
        items: list[tuple[str, str, bytes]] = []
        for window in closing.values():
            items += _items_of(window)
        if not items and not closing:
            return 0
        return self.buffer.put_many(items, clear_checkpoints_of=self.owner)

    def flush(self) -> int:
        """Close the open windows now (at shutdown, or before an upload in tests)."""
        return self.tick(force=True)

    def event(self, event: dict[str, Any]) -> bool:
        """Buffer an event dict (``device_agent.telemetry.events``)."""
        return self.buffer.put("event", str(event["type"]), event)

    def install(
        self,
        model: str,
        to_version: int,
        result: str,
        from_version: int | None = None,
        deployment_id: int | None = None,
        reason: str | None = None,
        state_path: Sequence[str] = (),
    ) -> bool:
        """Buffer the outcome of an install (kept before anything else when the disk cap is reached)."""
        return self.event(install_event(model, to_version, result, from_version, deployment_id, reason, state_path))

    def heartbeat(self, uptime_s: float, models: Sequence[Mapping[str, Any]], **fields: Any) -> bool:
        """Buffer a heartbeat; only the newest one is kept while offline.

        ``models`` lists name, version and state (active, previous, shadow ...); ``fields`` adds what
        the agent knows of its health (``health``, ``queue`` counters ...).
        """
        return self.event(heartbeat_event(uptime_s, models, buffer=self.buffer.stats(), **fields))

    def breaker_changed(self, model: str, state: str, failures: int) -> bool:
        """Buffer a circuit-breaker state change of the cloud fallback."""
        return self.event(make_event("breaker", model, None, state=state, failures=failures))


def _forced_reason(source: str | None, fallback_reason: str | None, low_confidence: bool) -> str | None:
    if source is None:
        return "error"
    if fallback_reason is not None and (source != "local" or fallback_reason == "deadline"):
        return "fallback"  # a late local answer (inline run past its deadline) is captured like a fallback
    if low_confidence:
        return "low_confidence"
    return None


def _items_of(window: _OpenWindow) -> list[tuple[str, str, bytes]]:
    """The compressed buffer items of a closing window: its samples, then the window if it has requests."""
    samples = window.sampler.close(window.manifest)
    for sample in samples:
        window.accumulator.count_capture(sample["capture_reason"])
    items = [("sample", s["capture_reason"], _compress(s)) for s in samples]
    payload = window.accumulator.close()
    if payload["counters"]["requests"] or payload["shadow"]["compared"]:
        items.append(("window", "window", _compress(payload)))
    return items


def _window_json(window: _OpenWindow) -> bytes | None:
    """An open window's payload as it would close now (None if it has counted nothing yet). Under the lock."""
    payload = window.accumulator.close()
    if not (payload["counters"]["requests"] or payload["shadow"]["compared"]):
        return None
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return "-"


def _start_ticks(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ('-' where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "-"


def process_identity() -> str:
    """``boot:pid:start``: tells this process apart from a later one that reuses its pid (or a reboot)."""
    return f"{_boot_id()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _owner_alive(owner: str) -> bool:
    """Does the process that wrote these checkpoints still run? (Unknown forms: assume it does.)"""
    parts = owner.split(":")
    if len(parts) < 3 or not parts[1].isdigit():
        return True
    boot, pid, start = parts[0], int(parts[1]), parts[2]
    if boot != _boot_id():
        return False  # written before a reboot (the power cut case)
    if start != "-" and _start_ticks(pid) != start:
        return False  # that pid is gone, or belongs to another process now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _compress(item: Mapping[str, Any]) -> bytes:
    return zlib.compress(json.dumps(item, separators=(",", ":")).encode("utf-8"), 6)


def _utc(epoch_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc)

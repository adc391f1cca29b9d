"""The local inference engine: the active predictor of each model, swapped without dropping requests.

Each model has one *active* loaded bundle and possibly a *previous* one (kept loaded for the
fallback chain and for an instant rollback). A request takes a reference to the active bundle and
counts itself in flight on it; :meth:`LocalEngine.load` builds the new predictor first, then swaps
the reference under a lock, so requests already running finish on the old predictor, which is closed
when its last request leaves. Concurrency is bounded: ``max_concurrency`` requests run at once,
``max_waiting`` more may wait up to ``queue_timeout_s``; beyond that :class:`BusyError` answers at
once, which the HTTP API turns into a 503.

During an update the new bundle is loaded *on trial* (:meth:`LocalEngine.load_candidate`) beside the
served one: the health check runs on it while requests keep going to the served bundle, and only
:meth:`LocalEngine.promote` (at commit) makes it answer.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import BusyError, ModelNotReadyError
from bundles.manifest import Manifest
from device_agent.health import check_health, rss_mb

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedBundle:
    """A predictor with where it came from and how many requests are using it."""

    predictor: Any
    manifest: Manifest
    bundle_dir: Path
    variant: str
    load_rss_mb: float
    in_flight: int = 0
    retired: bool = False
    closed: bool = field(default=False, repr=False)

    def close_if_idle(self) -> None:
        """Close once retired and unused (called with the engine's lock held)."""
        if self.retired and self.in_flight == 0 and not self.closed:
            self.closed = True
            close = getattr(self.predictor, "close", None)
            if callable(close):
                close()


@dataclass
class QueueStats:
    """Admission counters, shown by ``edgefleet-agent status``."""

    running: int = 0
    waiting: int = 0
    completed: int = 0
    rejected: int = 0


class LocalEngine:
    """Holds the active predictor per model and runs predictions under a concurrency bound."""

    def __init__(
        self,
        threads: int = 0,
        max_concurrency: int = 4,
        max_waiting: int = 16,
        queue_timeout_s: float = 1.0,
        capabilities: Any = None,
    ) -> None:
        self.threads = threads
        self.max_concurrency, self.max_waiting, self.queue_timeout_s = max_concurrency, max_waiting, queue_timeout_s
        self.capabilities = capabilities
        self._lock = threading.Lock()
        self._admission = threading.Condition(self._lock)
        self._active: dict[str, LoadedBundle] = {}
        self._previous: dict[str, LoadedBundle] = {}
        self._candidate: dict[str, LoadedBundle] = {}
        self.stats = QueueStats()

    # --- the protocol the serving pipeline codes against ---------------------------------------

    def ready(self, model: str) -> bool:
        return model in self._active

    def active_manifest(self, model: str) -> Manifest | None:
        loaded = self._active.get(model)
        return None if loaded is None else loaded.manifest

    def previous_predictor(self, model: str) -> Any:
        loaded = self._previous.get(model)
        return None if loaded is None else loaded.predictor

    def models(self) -> list[str]:
        return sorted(self._active)

    def only_model(self) -> str | None:
        """The model's name when exactly one is loaded (the common case on a device)."""
        if len(self._active) != 1:
            return None
        return next(iter(self._active))

    def predict(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> Any:
        """Run one prediction on the active bundle of ``model``.

        Raises:
            ModelNotReadyError: no bundle of ``model`` is loaded.
            BusyError: the engine is saturated (too many running and waiting requests).
        """
        loaded = self._enter(model, timeout_s)
        try:
            return loaded.predictor.predict(inputs)
        finally:
            self._release(loaded)

    def predict_batch(self, model: str, batch: list[dict[str, np.ndarray]]) -> list[Any]:
        """Several predictions on the same bundle version (one admission)."""
        loaded = self._enter(model, None)
        try:
            return list(loaded.predictor.predict_batch(batch))
        finally:
            self._release(loaded)

    def acquire(self, model: str, timeout_s: float | None = None) -> LoadedBundle:
        """Admit a request and pin the active bundle for as long as the caller needs it (a streamed generation);
        every :meth:`acquire` needs its :meth:`release`. Raises like :meth:`predict`."""
        return self._enter(model, timeout_s)

    def release(self, loaded: LoadedBundle) -> None:
        """End what :meth:`acquire` began."""
        self._release(loaded)

    # --- admission ------------------------------------------------------------------------------

    def _enter(self, model: str, timeout_s: float | None) -> LoadedBundle:
        """Admit a request and pin the active bundle; one lock round trip when not saturated."""
        with self._lock:
            loaded = self._active.get(model)
            if loaded is not None and self.stats.running < self.max_concurrency:
                self.stats.running += 1
                loaded.in_flight += 1
                return loaded
        self._admit(model, self.queue_timeout_s if timeout_s is None else min(timeout_s, self.queue_timeout_s))
        return self._acquire(model)

    def _admit(self, model: str, timeout_s: float) -> None:
        with self._admission:
            if model not in self._active:
                raise ModelNotReadyError(f"model '{model}' is not loaded on this device")
            if self.stats.running < self.max_concurrency:
                self.stats.running += 1
                return
            if self.stats.waiting >= self.max_waiting:
                self.stats.rejected += 1
                raise BusyError(self._busy_message())
            self.stats.waiting += 1
            try:
                admitted = self._admission.wait_for(lambda: self.stats.running < self.max_concurrency, timeout_s)
            finally:
                self.stats.waiting -= 1
            if not admitted:
                self.stats.rejected += 1
                raise BusyError(self._busy_message())
            self.stats.running += 1

    def _busy_message(self) -> str:
        return (
            f"the device is busy: {self.stats.running} requests running and {self.stats.waiting} waiting "
            f"(max_concurrency={self.max_concurrency}, max_waiting={self.max_waiting}); retry later"
        )

    def _acquire(self, model: str) -> LoadedBundle:
        with self._lock:
            loaded = self._active.get(model)
            if loaded is None:
                self.stats.running -= 1
                self._admission.notify()
                raise ModelNotReadyError(f"model '{model}' is not loaded on this device")
            loaded.in_flight += 1
            return loaded

    def _release(self, loaded: LoadedBundle) -> None:
        with self._lock:
            loaded.in_flight -= 1
            if loaded.retired:
                loaded.close_if_idle()
            self.stats.running -= 1
            self.stats.completed += 1
            if self.stats.waiting:
                self._admission.notify()

    # --- the model host the update steps use ----------------------------------------------------

    def load(self, model: str, bundle_dir: Path, variant: str, keep_current: bool = True, verify: bool = True) -> None:
        """Serve the bundle in ``bundle_dir``; the current one becomes ``previous`` if ``keep_current``.

        A rollback passes ``keep_current=False`` so the bundle that failed is dropped, not kept for
        the fallback chain. If the previous bundle is this very one (same directory and manifest),
        it is swapped back without loading anything: that is the instant rollback.
        """
        manifest = Manifest.from_bytes((bundle_dir / "manifest.json").read_bytes())
        previous = self._previous.get(model)
        if previous is not None and _same(previous, bundle_dir, manifest, variant):
            self._swap(model, previous, keep_current)
            return
        self._swap(model, self._load_bundle(manifest, bundle_dir, variant, verify), keep_current)

    def _load_bundle(self, manifest: Manifest, bundle_dir: Path, variant: str, verify: bool = True) -> LoadedBundle:
        """``verify=False`` only when the caller has just checked every file's sha256 itself."""
        from bundles.predictor import Predictor

        threads = self.threads or manifest.runtime_config.threads or None
        before = rss_mb()
        predictor = Predictor.load(
            manifest, bundle_dir, variant=variant, caps=self.capabilities, threads=threads, verify=verify
        )
        return LoadedBundle(predictor, manifest, bundle_dir, variant, max(0.0, rss_mb() - before))

    def _swap(self, model: str, new: LoadedBundle, keep_current: bool) -> None:
        with self._lock:
            old, previous = self._active.get(model), self._previous.pop(model, None)
            self._active[model] = new
            if keep_current and old is not None and old is not new:
                self._previous[model] = old
            elif previous is not None and previous is not new and not keep_current:
                self._previous[model] = previous
            for bundle in (old, previous):
                if bundle is not None and bundle is not new and self._previous.get(model) is not bundle:
                    bundle.retired = True
                    bundle.close_if_idle()
        log.info("serving %s from %s", new.manifest.ref, new.bundle_dir)

    def serving_dir(self, model: str) -> Path | None:
        loaded = self._active.get(model)
        return None if loaded is None else loaded.bundle_dir

    # --- bundles on trial: loaded beside the served one, never answering a request ----------------

    def load_candidate(self, model: str, bundle_dir: Path, variant: str) -> None:
        """Load a bundle on trial next to the served one (reusing the previous one if it is the same)."""
        manifest = Manifest.from_bytes((bundle_dir / "manifest.json").read_bytes())
        current = self._candidate.get(model)
        if current is not None and _same(current, bundle_dir, manifest, variant):
            return
        previous = self._previous.get(model)
        reuse = previous is not None and _same(previous, bundle_dir, manifest, variant)
        loaded = previous if reuse and previous is not None else self._load_bundle(manifest, bundle_dir, variant)
        with self._lock:
            old, self._candidate[model] = self._candidate.get(model), loaded
            self._retire_unless_used(model, old)

    def candidate_dir(self, model: str) -> Path | None:
        loaded = self._candidate.get(model)
        return None if loaded is None else loaded.bundle_dir

    def promote(self, model: str) -> None:
        """Serve the bundle on trial (requests in flight finish on the old one, kept as previous)."""
        with self._lock:
            candidate = self._candidate.pop(model, None)
        if candidate is None:
            raise ModelNotReadyError(f"model '{model}' has no bundle on trial to promote")
        self._swap(model, candidate, keep_current=True)

    def drop_candidate(self, model: str) -> None:
        """Forget the bundle on trial (it failed, or the deployment is abandoned)."""
        with self._lock:
            self._retire_unless_used(model, self._candidate.pop(model, None))

    def _retire_unless_used(self, model: str, bundle: LoadedBundle | None) -> None:
        """Close ``bundle`` (once idle) unless it is still active, previous or on trial. Lock held."""
        in_use = (self._active.get(model), self._previous.get(model), self._candidate.get(model))
        if bundle is not None and all(bundle is not b for b in in_use):
            bundle.retired = True
            bundle.close_if_idle()

    def health_check(
        self, model: str, runs: int = 5, latency_slack: float = 1.5, memory_slack: float = 1.5
    ) -> dict[str, Any]:
        """Golden self-test plus latency and memory budgets of the bundle on trial."""
        loaded = self._candidate.get(model)
        if loaded is None:
            raise ModelNotReadyError(f"model '{model}' has no bundle on trial to check")
        return check_health(loaded.predictor, loaded.manifest, loaded.load_rss_mb, runs, latency_slack, memory_slack)

    def unload(self, model: str) -> None:
        """Stop serving ``model`` (requests in flight finish first)."""
        with self._lock:
            for table in (self._active, self._previous, self._candidate):
                loaded = table.pop(model, None)
                if loaded is not None:
                    loaded.retired = True
                    loaded.close_if_idle()

    def describe(self) -> dict[str, Any]:
        """Active and previous bundle per model plus queue counters (for ``status``)."""
        with self._lock:
            models = {
                name: {
                    "version": loaded.manifest.version,
                    "variant": loaded.variant,
                    "runtime": loaded.predictor.runtime_name,
                    "bundle_dir": str(loaded.bundle_dir),
                    "previous_version": None if name not in self._previous else self._previous[name].manifest.version,
                }
                for name, loaded in self._active.items()
            }
            queue = dict(vars(self.stats))
        return {"models": models, "queue": queue, "max_concurrency": self.max_concurrency}

    def close(self) -> None:
        for model in list(self._active):
            self.unload(model)


def _same(loaded: LoadedBundle, bundle_dir: Path, manifest: Manifest, variant: str) -> bool:
    return loaded.bundle_dir == bundle_dir and loaded.variant == variant and loaded.manifest == manifest

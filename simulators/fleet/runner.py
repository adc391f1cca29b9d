"""Runs a scenario: servers up, bundles published, the fleet enrolled, rollouts driven, evidence kept.

Flow of :meth:`Simulation.run`:

1. :class:`~simulators.fleet.server.ServerCluster` starts the server process(es); the operator
   installs the release root and publishes every bundle of the scenario (real TUF publications).
2. N :class:`~simulators.fleet.device.VirtualDevice` objects are created, each a task on one asyncio
   event loop; a task calls the device's blocking :meth:`step` in a bounded thread pool and then
   sleeps (on the loop) for the delay the step returned (the server's poll interval with jitter, a
   backoff, a reboot). Enrollment is paced at ``enroll_per_s``.
3. The fleet is put on version 1 by a one-wave rollout (no gates), then each scenario rollout is
   created and watched until it ends and the fleet has followed its outcome. Faults are injected
   on schedule (offline devices, the leader process killed and restarted).
4. Once a second, a sample of the fleet (devices per version and state), the rollout's state and
   its latest gate figures go into the timeline; the report (:mod:`.report`) is made from it.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bundles.errors import EdgeFleetError
from simulators.fleet.device import MODEL, DeviceFaults, Fleet, VirtualDevice
from simulators.fleet.net import Balancer
from simulators.fleet.profiles import assign_profiles
from simulators.fleet.resources import ProcessSampler, histogram_quantiles
from simulators.fleet.scenario import RolloutSpec, Scenario
from simulators.fleet.server import Operator, ServerCluster, SimulationError

TERMINAL = ("completed", "rolled_back", "aborted", "paused", "failed")


@dataclass
class Sample:
    t_s: float
    versions: dict[str, int]
    states: dict[str, int]
    rollout: str
    rollout_state: str
    wave: int | None
    polls: int
    bytes_down: int
    gates: dict[str, float] = field(default_factory=dict)  # the current wave's gate values (last evaluation)


@dataclass
class RolloutOutcome:
    label: str
    version: int
    rollout_id: int
    expect: str
    state: str = "running"
    started_s: float = 0.0
    decided_s: float | None = None
    converged_s: float | None = None
    exposed: int = 0
    without_working_model: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    waves: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == self.expect and self.converged_s is not None and self.without_working_model == 0


@dataclass
class SimulationResult:
    scenario: str
    devices: int
    enrolled: int
    database: str
    processes: int
    duration_s: float
    rollouts: list[RolloutOutcome]
    timeline: list[Sample]
    totals: dict[str, float]
    server: dict[str, float]
    events: list[tuple[float, str]]
    work_dir: Path

    expected_rollouts: int = 0

    @property
    def ok(self) -> bool:
        complete = len(self.rollouts) == self.expected_rollouts
        return complete and all(r.ok for r in self.rollouts) and self.enrolled == self.devices


class Simulation:
    """One run of a scenario (see the module docstring)."""

    def __init__(self, scenario: Scenario, work_dir: Path, console: Console | None = None,
                 progress: bool = True) -> None:  # fmt: skip
        self.scenario, self.work_dir = scenario, work_dir
        self.console = console or Console()
        self.show_progress = progress
        self.devices: list[VirtualDevice] = []
        self.timeline: list[Sample] = []
        self.events: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self.stopping = False
        self.current: tuple[str, str, Any] = ("", "", None)  # label, state, wave
        self.current_gates: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def note(self, what: str) -> None:
        self.events.append((round(self.elapsed(), 2), what))
        if not self.show_progress:
            return
        self.console.log(what)

    # --- setup ----------------------------------------------------------------------------------------

    def run(self) -> SimulationResult:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        self.cluster = ServerCluster(self.scenario.server, self.work_dir)
        self.sampler = ProcessSampler()
        try:
            self.note(
                f"starting {self.scenario.server.processes} server process(es) on {self.scenario.server.database}"
            )
            self.cluster.start()
            self.operator = Operator(self.cluster.url, self.cluster.admin_key, self.work_dir)
            self.operator.install_root()
            for bundle in self.scenario.bundles:
                self.operator.publish(bundle.version)
            self.note(f"published {MODEL} versions {', '.join(str(b.version) for b in self.scenario.bundles)}")
            return asyncio.run(self._main())
        finally:
            self.cluster.stop()

    def _make_devices(self, balancer: Balancer, token: str) -> None:
        spec, faults = self.scenario.fleet, self.scenario.faults
        behaviours = {b.version: (b.behaviour, b.rate) for b in self.scenario.bundles}
        self.fleet = Fleet(self.cluster.url, token, balancer, self.work_dir, behaviours, started_at=float("inf"))
        self.fleet.cloud_fallback = spec.cloud_fallback
        rng = random.Random(spec.seed)  # noqa: S311 - simulation
        for index, profile in enumerate(assign_profiles(spec.devices, spec.profiles)):
            drawn = DeviceFaults(
                packet_loss=faults.packet_loss, cut=faults.cut_download, corrupt=faults.corrupt_download,
                power_loss=faults.power_loss,
                slow_factor=20.0 if rng.random() < faults.slow_link_share else 1.0,
                clock_skew_s=faults.clock_skew_s if rng.random() < faults.clock_skew_share else 0.0,
                offline_from_s=faults.offline_at_s if rng.random() < faults.offline_share else None,
                offline_s=faults.offline_s,
            )  # fmt: skip
            device = VirtualDevice(index, profile, self.fleet, drawn, seed=spec.seed * 1_000_003 + index)
            device.rate = spec.requests_per_s
            self.devices.append(device)

    # --- the loop ---------------------------------------------------------------------------------------

    async def _main(self) -> SimulationResult:
        spec = self.scenario.fleet
        balancer = Balancer(self.cluster.ports, pool_size=spec.concurrency * 2)
        self._make_devices(balancer, self.operator.enroll_token())
        self.executor = ThreadPoolExecutor(spec.concurrency, thread_name_prefix="device")
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console,
                            disable=not self.show_progress, transient=False)  # fmt: skip
        tasks = [asyncio.create_task(self._drive(d, i / spec.enroll_per_s)) for i, d in enumerate(self.devices)]
        watcher = asyncio.create_task(self._watch())
        outcomes: list[RolloutOutcome] = []
        started = self.elapsed()
        try:
            with progress:
                await self._enrolled(progress)
                baseline = RolloutSpec(version=1, waves="100%", gates=(), soak="0s", device_timeout="1h",
                                       expect="completed", timeout_s=max(120.0, spec.devices / 4))  # fmt: skip
                outcomes.append(await self._rollout(progress, baseline, "baseline v1"))
                self.fleet.started_at = time.time()
                fault_task = asyncio.create_task(self._server_faults())
                for i, rollout in enumerate(self.scenario.rollouts):
                    if outcomes[-1].decided_s is None:  # the previous rollout still holds the devices (409)
                        self.note(f"rollout {i + 1}: v{rollout.version} not started: the previous one did not end")
                        break
                    outcomes.append(await self._rollout(progress, rollout, f"rollout {i + 1}: v{rollout.version}"))
                fault_task.cancel()
        finally:
            self.stopping = True
            watcher.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, watcher, return_exceptions=True)
            self.executor.shutdown(wait=True, cancel_futures=True)
            balancer.close()
        return self._result(outcomes, self.elapsed() - started)

    async def _drive(self, device: VirtualDevice, start_after_s: float) -> None:
        """One device's life: step in a worker thread, sleep on the loop, again."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(start_after_s)
        while not self.stopping:
            try:
                delay = await loop.run_in_executor(self.executor, device.step)
            except EdgeFleetError:
                delay = 5.0 + device.rng.uniform(0, 5)  # enrollment refused or the server unreachable: try again
            except Exception as e:  # noqa: BLE001 - a device's bug must not stop the fleet; it is counted
                device.state = "failed"
                self.note(f"device {device.index} failed: {type(e).__name__}: {e}")
                return
            await asyncio.sleep(max(0.05, delay))

    async def _enrolled(self, progress: Progress) -> None:
        task = progress.add_task("enrolling", total=len(self.devices), status="")
        # paced at enroll_per_s, but a loaded server enrolls slower: allow at least 10 devices/s
        deadline = time.monotonic() + 120 + len(self.devices) / min(self.scenario.fleet.enroll_per_s, 10.0)
        while time.monotonic() < deadline:
            done = sum(d.device_id is not None for d in self.devices)
            progress.update(task, completed=done)
            if done == len(self.devices):
                self.note(f"{done} devices enrolled")
                return
            await asyncio.sleep(0.5)
        raise SimulationError(f"only {sum(d.device_id is not None for d in self.devices)} devices enrolled in time")

    async def _rollout(self, progress: Progress, spec: RolloutSpec, label: str) -> RolloutOutcome:
        body = {"bundle": f"{MODEL}@{spec.version}", "targets": ["where:fleet=sim"], "waves": spec.waves,
                "gates": list(spec.gates), "soak": spec.soak, "device_timeout": spec.device_timeout,
                "jitter": spec.jitter, "on_breach": spec.on_breach}  # fmt: skip
        previous = {d.running for d in self.devices}
        rollout_id = await asyncio.to_thread(self.operator.create_rollout, body)
        outcome = RolloutOutcome(label, spec.version, rollout_id, spec.expect, started_s=self.elapsed())
        self.note(f"{label}: rollout {rollout_id} created ({spec.waves}; gates {', '.join(spec.gates) or 'none'})")
        task = progress.add_task(label, total=len(self.devices), status="running")
        deadline = time.monotonic() + spec.timeout_s
        while time.monotonic() < deadline:
            view = await asyncio.to_thread(self._view, rollout_id)
            state = str(view.get("state", "?"))
            self.current = (label, state, view.get("current_wave"))
            self.current_gates = _wave_gates(view)
            on_target = sum(d.running == spec.version for d in self.devices)
            progress.update(task, completed=on_target, status=f"{state} wave {view.get('current_wave')}")
            if state in TERMINAL and outcome.decided_s is None:
                outcome.decided_s, outcome.state = self.elapsed(), state
                self.note(f"{label}: {state} ({_last_reason(view)})")
            if outcome.decided_s is not None and self._converged(outcome, previous):
                outcome.converged_s = self.elapsed()
                break
            await asyncio.sleep(1.0)
        final = await asyncio.to_thread(self._view, rollout_id)
        outcome.decisions, outcome.waves = list(final.get("decisions", [])), list(final.get("waves", []))
        outcome.state = str(final.get("state", outcome.state))
        outcome.exposed = sum(spec.version in d.versions_run for d in self.devices)
        outcome.without_working_model = sum(not self._works(d) for d in self.devices)
        progress.update(
            task, status=f"{outcome.state}; converged" if outcome.converged_s else f"{outcome.state}; timed out"
        )
        if outcome.converged_s is None:
            self.note(f"{label}: the fleet did not converge within {spec.timeout_s:.0f} s")
        return outcome

    def _view(self, rollout_id: int) -> dict[str, Any]:
        try:
            return self.operator.rollout(rollout_id)
        except SimulationError:
            return {"state": "unreachable"}

    def _works(self, device: VirtualDevice) -> bool:
        """A device has a working model: it runs a version whose behaviour is good."""
        if device.running is None:
            return False
        return self.scenario.bundle(device.running).behaviour == "good"

    def _converged(self, outcome: RolloutOutcome, previous: set[int | None]) -> bool:
        if outcome.state == "completed":
            return all(d.running == outcome.version for d in self.devices)
        before = {v for v in previous if v is not None and v != outcome.version}
        return all(d.running in before for d in self.devices)

    async def _watch(self) -> None:
        """Sample the fleet every second (the timeline) and the server processes' CPU and memory."""
        while True:
            await asyncio.sleep(1.0)
            self.timeline.append(self._sample())
            self.sampler.sample(self.cluster.pids())

    def _sample(self) -> Sample:
        versions: dict[str, int] = {}
        states: dict[str, int] = {}
        polls = down = 0
        for d in self.devices:
            key = "none" if d.running is None else f"v{d.running}"
            versions[key] = versions.get(key, 0) + 1
            states[d.state] = states.get(d.state, 0) + 1
            polls += d.counters.polls
            down += d.link.stats.bytes_down
        label, state, wave = self.current
        gates = {f"{label}: {k}": v for k, v in self.current_gates.items()}
        return Sample(round(self.elapsed(), 2), versions, states, label, state, wave, polls, down, gates)

    async def _server_faults(self) -> None:
        faults = self.scenario.faults
        if faults.server_restart_at_s is None:
            return
        await asyncio.sleep(faults.server_restart_at_s)
        leader = await asyncio.to_thread(self.cluster.leader_index)
        index = 0 if leader is None else leader
        await asyncio.to_thread(self.cluster.kill, index)
        self.note(f"fault: server process {index} (background leader: {leader is not None}) killed with SIGKILL")
        await asyncio.sleep(faults.server_down_s)
        await asyncio.to_thread(self.cluster.start_process, index)
        await asyncio.to_thread(self.cluster.wait_ready, index)
        self.note(f"server process {index} restarted")

    # --- results ----------------------------------------------------------------------------------------

    def _result(self, outcomes: list[RolloutOutcome], duration_s: float) -> SimulationResult:
        counters = [d.counters for d in self.devices]
        latencies = [x for c in counters for x in c.poll_latency_ms]
        polls = sum(c.polls for c in counters)
        totals = {
            "polls": polls, "polls_per_s": polls / duration_s if duration_s else 0.0,
            "not_modified": sum(c.not_modified for c in counters),
            "poll_p50_ms": _quantile(latencies, 0.5), "poll_p99_ms": _quantile(latencies, 0.99),
            "bytes_down": sum(d.link.stats.bytes_down for d in self.devices),
            "bytes_up": sum(d.link.stats.bytes_up for d in self.devices),
            "requests": sum(c.requests for c in counters), "errors": sum(c.errors for c in counters),
            "fallbacks": sum(c.fallbacks for c in counters),
            "installs": sum(c.installs for c in counters),
            "install_failures": sum(c.install_failures for c in counters),
            "power_losses": sum(c.power_losses for c in counters),
            "transport_errors": sum(c.transport_errors for c in counters),
            "trust_errors": sum(c.trust_errors for c in counters),
            "injected_faults": sum(d.link.stats.faults for d in self.devices),
            "uploads": sum(c.uploads for c in counters),
        }  # fmt: skip
        totals["fallback_rate"] = totals["fallbacks"] / totals["requests"] if totals["requests"] else 0.0
        totals["error_rate"] = totals["errors"] / totals["requests"] if totals["requests"] else 0.0
        server = {**self.sampler.summary(), **self._tick_quantiles()}
        spec = self.scenario
        return SimulationResult(spec.name, len(self.devices), sum(d.device_id is not None for d in self.devices),
                                spec.server.database, spec.server.processes, duration_s, outcomes, self.timeline,
                                totals, server, self.events, self.work_dir, len(spec.rollouts) + 1)  # fmt: skip

    def _tick_quantiles(self) -> dict[str, float]:
        texts = [self.cluster.metrics(i) for i in range(len(self.cluster.ports))]
        return histogram_quantiles(texts, "edgefleet_rollout_tick_duration_seconds", (0.5, 0.99), "rollout_tick")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, round(q * 100) - 1))])


def _wave_gates(view: dict[str, Any]) -> dict[str, float]:
    """The gate values of the rollout's current wave (its last evaluation), by gate text."""
    waves = view.get("waves") or []
    current = view.get("current_wave")
    wave = next((w for w in waves if w.get("index") == current), None)
    if wave is None:
        return {}
    return {
        str(g["gate"]): float(g["value"]) for g in wave.get("gates") or [] if isinstance(g.get("value"), int | float)
    }


def _last_reason(view: dict[str, Any]) -> str:
    decisions = view.get("decisions") or []
    return str(decisions[-1].get("reason", ""))[:200] if decisions else ""

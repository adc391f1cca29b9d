"""Runs a scenario: servers up, bundles published, the fleet enrolled, rollouts driven, evidence kept.

Flow of :meth:`Simulation.run`:

1. :class:`~simulators.fleet.server.ServerCluster` starts the server process(es); the operator
   installs the release root and publishes every bundle of the scenario (real TUF publications).
2. The fleet is sharded over ``[simulator] workers`` processes (:mod:`.worker`; one Python process is
   GIL-bound). In each, its :class:`~simulators.fleet.device.VirtualDevice` objects are tasks on the
   process's asyncio event loop; a task calls the device's blocking :meth:`step` in a bounded thread pool
   and then sleeps (on the loop) for the delay the step returned (the server's poll interval with
   jitter, a backoff, a reboot). Enrollment is paced at ``enroll_per_s`` over the whole fleet. The
   workers send their counts twice a second; this process adds them up (:class:`Workers`), and a worker
   that dies ends the run with a :class:`~simulators.fleet.server.SimulationError` naming it.
3. The fleet is put on version 1 by a one-wave rollout (no gates), then each scenario rollout is
   created and watched until it ends and the fleet has followed its outcome. Faults are injected
   on schedule (offline devices, the leader process killed and restarted).
4. Once a second, a sample of the fleet (devices per version and state, summed over the workers), the
   rollout's state and its latest gate figures go into the timeline; the report (:mod:`.report`) is
   made from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import shutil
import statistics
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from simulators.fleet.device import MODEL
from simulators.fleet.resources import ProcessSampler, histogram_quantiles
from simulators.fleet.scenario import RolloutSpec, Scenario
from simulators.fleet.server import Operator, ServerCluster, SimulationError
from simulators.fleet.worker import (
    COUNTERS,
    ShardPlan,
    Snapshot,
    Totals,
    auto_workers,
    merge_snapshots,
    merge_totals,
    worker_main,
)

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
    workers: int = 1  # simulator processes

    @property
    def ok(self) -> bool:
        complete = len(self.rollouts) == self.expected_rollouts
        return complete and all(r.ok for r in self.rollouts) and self.enrolled == self.devices


class Workers:
    """The runner's side of the simulator worker processes (:mod:`.worker`): start them, read their
    messages, notice one that died (a :class:`SimulationError` naming it, never a hang), stop them."""

    def __init__(self, plans: list[ShardPlan]) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding threads and sockets
        self.processes: list[BaseProcess] = []
        self.conns: list[Connection] = []
        for plan in plans:
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(plan, child), daemon=True,
                                      name=f"edgefleet-sim-worker-{plan.shard}")  # fmt: skip
            process.start()
            child.close()
            self.processes.append(process)
            self.conns.append(parent)
        self.snapshots: list[Snapshot | None] = [None] * len(plans)
        self.finals: dict[int, Totals] = {}
        self.errors: list[str] = []

    def pump(self) -> list[str]:
        """Read every waiting message; returns the workers' notes; raises if a worker failed or died."""
        notes: list[str] = []
        for i, conn in enumerate(self.conns):
            try:
                while conn.poll():
                    kind, value = conn.recv()
                    if kind == "snapshot":
                        self.snapshots[i] = value
                    elif kind == "final":
                        self.finals[i] = value
                    elif kind == "note":
                        notes.append(str(value))
                    elif kind == "error":
                        self.errors.append(str(value))
            except (EOFError, OSError):
                pass  # the worker is gone; is_alive() below says so
        if self.errors:
            raise SimulationError(self.errors[0].strip().splitlines()[-1] + f" ({self.errors[0].splitlines()[0]})")
        for i, process in enumerate(self.processes):
            if i not in self.finals and not process.is_alive():
                last = self.snapshots[i]
                devices = "its devices" if last is None else f"its {last.devices} devices"
                raise SimulationError(
                    f"simulator worker {i} (pid {process.pid}) died with exit code {process.exitcode}; "
                    f"{devices} stopped and the run cannot be judged"
                )
        return notes

    def ready(self) -> bool:
        return all(s is not None for s in self.snapshots)

    def send(self, command: str, value: object = None) -> None:
        for i, conn in enumerate(self.conns):
            if self.processes[i].is_alive():
                try:
                    conn.send((command, value))
                except (BrokenPipeError, OSError):
                    pass  # pump() reports the dead worker

    def fleet(self) -> Snapshot:
        return merge_snapshots([s for s in self.snapshots if s is not None])

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None and p.is_alive()]

    def stop(self, timeout_s: float = 120.0) -> Totals:
        """Ask every worker to stop and send its totals; a worker that does not within the timeout is killed."""
        self.send("stop")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
            i not in self.finals and p.is_alive() for i, p in enumerate(self.processes)
        ):
            with contextlib.suppress(SimulationError):
                self.pump()
            time.sleep(0.1)
        with contextlib.suppress(SimulationError):
            self.pump()  # a worker that sent its totals and exited between two reads: they wait in the pipe
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        for conn in self.conns:
            conn.close()
        return merge_totals(list(self.finals.values()))


class Simulation:
    """One run of a scenario (see the module docstring)."""

    def __init__(self, scenario: Scenario, work_dir: Path, console: Console | None = None,
                 progress: bool = True) -> None:  # fmt: skip
        self.scenario, self.work_dir = scenario, work_dir
        self.console = console or Console()
        self.show_progress = progress
        self.workers_count = scenario.simulator.workers or auto_workers(scenario.fleet.devices)
        self.workers_count = min(self.workers_count, scenario.fleet.devices)
        self.timeline: list[Sample] = []
        self.events: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self.current: tuple[str, str, Any] = ("", "", None)  # label, state, wave
        self.current_gates: dict[str, float] = {}
        self.fleet_now = Snapshot()

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
        self.sampler, self.sim_sampler = ProcessSampler(), ProcessSampler()
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

    def _plans(self, token: str) -> list[ShardPlan]:
        return [ShardPlan(self.scenario, shard, self.workers_count, self.cluster.url, tuple(self.cluster.ports),
                          token, self.work_dir) for shard in range(self.workers_count)]  # fmt: skip

    # --- the loop ---------------------------------------------------------------------------------------

    async def _main(self) -> SimulationResult:
        spec = self.scenario.fleet
        self.workers = Workers(self._plans(self.operator.enroll_token()))
        self.note(f"{spec.devices} devices on {self.workers_count} simulator process(es)")
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console,
                            disable=not self.show_progress, transient=False)  # fmt: skip
        outcomes: list[RolloutOutcome] = []
        watcher: asyncio.Task[None] | None = None
        started = self.elapsed()
        totals = Totals()
        try:
            await self._start_workers()
            watcher = asyncio.create_task(self._watch())
            with progress:
                await self._enrolled(progress)
                baseline = RolloutSpec(version=1, waves="100%", gates=(), soak="0s", device_timeout="1h",
                                       expect="completed", timeout_s=max(120.0, spec.devices / 4))  # fmt: skip
                outcomes.append(await self._rollout(progress, baseline, "baseline v1"))
                self.workers.send("faults_from", time.time())
                fault_task = asyncio.create_task(self._server_faults())
                for i, rollout in enumerate(self.scenario.rollouts):
                    if outcomes[-1].decided_s is None:  # the previous rollout still holds the devices (409)
                        self.note(f"rollout {i + 1}: v{rollout.version} not started: the previous one did not end")
                        break
                    outcomes.append(await self._rollout(progress, rollout, f"rollout {i + 1}: v{rollout.version}"))
                fault_task.cancel()
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            totals = await asyncio.to_thread(self.workers.stop)
        return self._result(outcomes, self.elapsed() - started, totals)

    async def _start_workers(self) -> None:
        """Wait until every worker made its devices, then start them all on one clock."""
        deadline = time.monotonic() + 120 + self.scenario.fleet.devices / 200
        while not self.workers.ready():
            self._pump()
            if time.monotonic() > deadline:
                raise SimulationError("the simulator workers did not start in time")
            await asyncio.sleep(0.1)
        self.workers.send("start", time.time())

    def _pump(self) -> Snapshot:
        """The workers' latest counts (raises SimulationError if one failed or died)."""
        for text in self.workers.pump():
            self.note(text)
        self.fleet_now = self.workers.fleet()
        return self.fleet_now

    async def _enrolled(self, progress: Progress) -> None:
        devices = self.scenario.fleet.devices
        task = progress.add_task("enrolling", total=devices, status="")
        # paced at enroll_per_s, but a loaded server enrolls slower: allow at least 10 devices/s
        deadline = time.monotonic() + 120 + devices / min(self.scenario.fleet.enroll_per_s, 10.0)
        while time.monotonic() < deadline:
            done = self._pump().enrolled
            progress.update(task, completed=done)
            if done == devices:
                self.note(f"{done} devices enrolled")
                return
            await asyncio.sleep(0.5)
        raise SimulationError(f"only {self._pump().enrolled} devices enrolled in time")

    async def _rollout(self, progress: Progress, spec: RolloutSpec, label: str) -> RolloutOutcome:
        body = {"bundle": f"{MODEL}@{spec.version}", "targets": ["where:fleet=sim"], "waves": spec.waves,
                "gates": list(spec.gates), "soak": spec.soak, "device_timeout": spec.device_timeout,
                "jitter": spec.jitter, "on_breach": spec.on_breach}  # fmt: skip
        previous = set(self._pump().versions)
        rollout_id = await asyncio.to_thread(self.operator.create_rollout, body)
        outcome = RolloutOutcome(label, spec.version, rollout_id, spec.expect, started_s=self.elapsed())
        self.note(f"{label}: rollout {rollout_id} created ({spec.waves}; gates {', '.join(spec.gates) or 'none'})")
        task = progress.add_task(label, total=self.scenario.fleet.devices, status="running")
        deadline = time.monotonic() + spec.timeout_s
        while time.monotonic() < deadline:
            view = await asyncio.to_thread(self._view, rollout_id)
            state = str(view.get("state", "?"))
            self.current = (label, state, view.get("current_wave"))
            self.current_gates = _wave_gates(view)
            fleet = self._pump()
            progress.update(task, completed=fleet.versions.get(f"v{spec.version}", 0),
                            status=f"{state} wave {view.get('current_wave')}")  # fmt: skip
            if state in TERMINAL and outcome.decided_s is None:
                outcome.decided_s, outcome.state = self.elapsed(), state
                self.note(f"{label}: {state} ({_last_reason(view)})")
            if outcome.decided_s is not None and self._converged(outcome, previous, fleet):
                outcome.converged_s = self.elapsed()
                break
            await asyncio.sleep(1.0)
        final = await asyncio.to_thread(self._view, rollout_id)
        outcome.decisions, outcome.waves = list(final.get("decisions", [])), list(final.get("waves", []))
        outcome.state = str(final.get("state", outcome.state))
        fleet = self._pump()
        outcome.exposed = fleet.exposed.get(spec.version, 0)
        outcome.without_working_model = sum(n for key, n in fleet.versions.items() if not self._works(key))
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

    def _works(self, version_key: str) -> bool:
        """Devices running ``version_key`` ("v2", "none") have a working model: a version whose behaviour is good."""
        if version_key == "none":
            return False
        return self.scenario.bundle(int(version_key[1:])).behaviour == "good"

    def _converged(self, outcome: RolloutOutcome, previous: set[str], fleet: Snapshot) -> bool:
        devices = self.scenario.fleet.devices
        target = f"v{outcome.version}"
        if outcome.state == "completed":
            return fleet.versions.get(target, 0) == devices
        before = previous - {"none", target}
        return sum(fleet.versions.get(key, 0) for key in before) == devices

    async def _watch(self) -> None:
        """Sample the fleet every second (the timeline) and the server and simulator processes' CPU and memory."""
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(SimulationError):  # the loops that wait on the fleet raise it
                self._pump()
            self.timeline.append(self._sample())
            self.sampler.sample(self.cluster.pids())
            self.sim_sampler.sample(self.workers.pids())

    def _sample(self) -> Sample:
        fleet = self.fleet_now
        label, state, wave = self.current
        gates = {f"{label}: {k}": v for k, v in self.current_gates.items()}
        return Sample(round(self.elapsed(), 2), dict(fleet.versions), dict(fleet.states), label, state, wave,
                      fleet.polls, fleet.bytes_down, gates)  # fmt: skip

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

    def _result(self, outcomes: list[RolloutOutcome], duration_s: float, sums: Totals) -> SimulationResult:
        c = sums.counts
        latencies = sums.poll_latency_ms
        totals: dict[str, float] = {
            **{key: float(c.get(key, 0)) for key in (*COUNTERS, "bytes_down", "bytes_up", "injected_faults")},
            "polls_per_s": c.get("polls", 0) / duration_s if duration_s else 0.0,
            "poll_p50_ms": _quantile(latencies, 0.5), "poll_p99_ms": _quantile(latencies, 0.99),
        }  # fmt: skip
        totals["fallback_rate"] = totals["fallbacks"] / totals["requests"] if totals["requests"] else 0.0
        totals["error_rate"] = totals["errors"] / totals["requests"] if totals["requests"] else 0.0
        simulator = self.sim_sampler.summary()
        server = {**self.sampler.summary(), **self._tick_quantiles(),
                  "simulator_cpu_s": simulator["server_cpu_s"],
                  "simulator_peak_rss_mb": simulator["server_peak_rss_mb"]}  # fmt: skip
        spec = self.scenario
        return SimulationResult(spec.name, spec.fleet.devices, self.fleet_now.enrolled, spec.server.database,
                                spec.server.processes, duration_s, outcomes, self.timeline, totals, server,
                                self.events, self.work_dir, len(spec.rollouts) + 1,
                                self.workers_count)  # fmt: skip

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

"""Fleet scale: N simulated devices (``edgefleet-sim``) against real fleet servers, SQLite and PostgreSQL.

For each database, the same scenario: the fleet enrolls (each device with its own Ed25519 key), is put
on version 1, then a good version 2 is rolled out in waves (``1%,100%``, gated on the error rate) and
must converge with no device left without a working model. The baseline, measured in the same run, is
the same scenario with ``--baseline-devices`` devices (default 1,000; 0 skips it): what grows with the
fleet, and what only follows the intervals.

Reported per run: convergence time of the rollout (creation to the whole fleet on v2), polls/s over the
run, poll latency p50/p99 as the devices saw it, rollout tick p50/p99 (the servers' histogram), server
CPU seconds and peak RSS (all server processes), bytes downloaded, and the largest fleet that converged.

Usage: ``python benchmarks/fleet_scale.py [--devices 10000] [--backends sqlite,postgresql]
[--processes-pg 2] [--baseline-devices 1000]``. Writes ``docs/benchmarks.md`` between
``<!-- BEGIN fleet_scale -->`` and ``<!-- END fleet_scale -->``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mdreport import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulators.fleet.runner import RolloutOutcome, Simulation, SimulationResult  # noqa: E402
from simulators.fleet.scenario import (  # noqa: E402
    BundleSpec,
    FaultSpec,
    FleetSpec,
    RolloutSpec,
    Scenario,
    ServerSpec,
)

GATES = ("error_rate<0.02 min=50",)


def scenario(devices: int, database: str, processes: int) -> Scenario:
    """The scale scenario: intervals an operator of a large fleet would set (poll 30 s, windows 60 s)."""
    return Scenario(
        name=f"fleet scale {devices} on {database}",
        server=ServerSpec(
            database=database,
            processes=processes,
            rollout_tick_s=2.0,
            telemetry_window_s=60,
            poll_interval_s=30,
            jitter_s=10,
        ),  # fmt: skip
        fleet=FleetSpec(
            devices=devices,
            profiles={"pi4": 0.4, "pi5": 0.3, "orin-nano": 0.2, "x86": 0.1},
            requests_per_s=0.5,
            concurrency=48,
            enroll_per_s=250.0,
        ),  # fmt: skip
        bundles=(BundleSpec(1), BundleSpec(2), BundleSpec(3, behaviour="errors", rate=0.2)),
        rollouts=(
            RolloutSpec(2, waves="1%,100%", gates=GATES, soak="30s", device_timeout="10m", timeout_s=1500),
            RolloutSpec(
                3,
                waves="1%,10%,100%",
                gates=GATES,
                soak="30s",
                device_timeout="10m",
                timeout_s=1500,
                expect="rolled_back",
            ),
        ),  # fmt: skip  # fmt: skip
        faults=FaultSpec(),
    )


def run(devices: int, database: str, processes: int, work: Path) -> SimulationResult:
    result = Simulation(scenario(devices, database, processes), work / f"{database}-{devices}").run()
    print(f"{database} {devices}: ok={result.ok} {result.totals['polls_per_s']:.0f} polls/s {result.server}")
    return result


def _after(outcome: RolloutOutcome, at: float | None) -> float | None:
    return None if at is None else at - outcome.started_s


def row(result: SimulationResult) -> dict[str, Any]:
    missing = RolloutOutcome("not started", 0, 0, "-", state="not started")
    _, good, bad = [*result.rollouts, missing, missing][:3]
    return {"database": result.database, "processes": result.processes, "devices": result.devices,
            "ok": result.ok, "good_converged_s": _after(good, good.converged_s), "good_state": good.state,
            "bad_state": bad.state, "bad_decided_s": _after(bad, bad.decided_s),
            "bad_exposed_pct": 100 * bad.exposed / max(result.devices, 1),
            "polls_per_s": result.totals["polls_per_s"],
            "poll_p50_ms": result.totals["poll_p50_ms"], "poll_p99_ms": result.totals["poll_p99_ms"],
            "tick_p50_ms": result.server.get("rollout_tick_p50_ms"),
            "tick_p99_ms": result.server.get("rollout_tick_p99_ms"),
            "cpu_s": result.server.get("server_cpu_s"), "rss_mb": result.server.get("server_peak_rss_mb"),
            "mb_down": result.totals["bytes_down"] / 1e6,
            "without": max(r.without_working_model for r in result.rollouts),
            "enrolled": result.enrolled,
            "duration_s": result.duration_s}  # fmt: skip


def _f(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]], load: tuple[float, float]) -> str:
    lines = [
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
        f"({platform.machine()}), Python {platform.python_version()}; the simulator (one process, devices as tasks "
        "on one event loop, 48 worker threads) and the server processes share the machine. Poll every 30 s "
        "(jitter 10 s), metric windows of 60 s. After enrollment and a one-wave rollout of v1: a good v2 in waves "
        "`1%,100%`, then a bad v3 (errors on 20 % of requests) in waves `1%,10%,100%`, both gated on "
        "`error_rate<0.02 min=50` with a 30 s soak. Command: `python benchmarks/fleet_scale.py`.",
        "",
        "| database | server processes | devices | as expected | good v2 converged after | bad v3 "
        "| bad v3 stopped after | exposed to v3 | polls/s | poll p50 / p99 ms | rollout tick p50 / p99 ms "
        "| server CPU s | server peak RSS MB "
        "| MB downloaded | without a working model |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['database']} | {r['processes']} | {r['devices']:,} | {'yes' if r['ok'] else '**no**'} "
            f"| {_f(r['good_converged_s'])} s | {r['bad_state']} | {_f(r['bad_decided_s'])} s "
            f"| {_f(r['bad_exposed_pct'], 2)} % | {_f(r['polls_per_s'], 1)} "
            f"| {_f(r['poll_p50_ms'], 1)} / {_f(r['poll_p99_ms'], 1)} "
            f"| {_f(r['tick_p50_ms'])} / {_f(r['tick_p99_ms'])} | {_f(r['cpu_s'])} | {_f(r['rss_mb'])} "
            f"| {_f(r['mb_down'], 1)} | {r['without']} |"
        )
    largest = max((r["devices"] for r in rows if r["ok"]), default=0)
    lines += ["", f"Largest fleet that behaved as expected in this run: **{largest:,} devices**. Load average "
              f"before / after: {load[0]:.1f} / {load[1]:.1f} (above 2: other work shared the two cores)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--processes-pg", type=int, default=2)
    parser.add_argument("--baseline-devices", type=int, default=1000)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="edgefleet-fleet-scale-"))
    load_before = os.getloadavg()[0]
    rows = []
    for database in args.backends.split(","):
        processes = args.processes_pg if database == "postgresql" else 1
        for devices in ([args.baseline_devices] if args.baseline_devices else []) + [args.devices]:
            rows.append(row(run(devices, database, processes, work)))
            text = table(rows, (load_before, os.getloadavg()[0]))  # written after each run: a long run keeps its rows
            write_section("fleet_scale", "Fleet scale: simulated devices against real fleet servers", text)
    print(text)


if __name__ == "__main__":
    main()

"""Fleet scale: N simulated devices (``edgefleet-sim``) against real fleet servers, SQLite and PostgreSQL.

Each run is the same scenario: the fleet enrolls (each device with its own Ed25519 key), is put on
version 1, then a good version 2 is rolled out in waves gated on the error and fallback rates and must
converge with no device left without a working model, then a bad version 3 (errors on a fifth of its
requests) must be stopped at its first wave and rolled back.

The device timings stand for a real fleet, not for a stress test (see ``docs/simulator.md``): a device
polls every ``POLL_S`` seconds (real agents poll every few minutes; Mender's default is 30 minutes) and
uploads a metric window at the same pace; a device released into a wave has ``DEVICE_TIMEOUT`` to show
it runs the new version through the soak. At 10,000 devices that is 10,000 / 180 s = 56 polls/s (plus
as many uploads): what a fleet of 100,000 devices polling every 30 minutes sends.

Reported per run: convergence time of the good rollout (creation to the whole fleet on v2), when the bad
one was stopped and how much of the fleet ran it, polls/s over the run, poll latency p50/p99 as the
devices saw it, rollout tick p50/p99 (the servers' histogram), server and simulator CPU seconds, server
peak RSS, bytes downloaded, and the largest fleet that behaved as expected.

Usage: ``python benchmarks/fleet_scale.py [--runs sqlite:10000:1,postgresql:10000:2] [--parallel]
[--include ROW.json]`` (``database:devices:server_processes``; ``--parallel`` runs them at the same time,
each in its own process, which the table says; ``--include`` shows the row of an earlier run first, from
the ``row-N.json`` a run leaves in its work directory). Writes ``docs/benchmarks.md`` between
``<!-- BEGIN fleet_scale -->`` and ``<!-- END fleet_scale -->`` after each run, so a long series keeps the
rows it finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
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
    SimulatorSpec,
)

POLL_S, JITTER_S = 180, 30  # the server's poll interval for the fleet, and its jitter (+/-)
WINDOW_S = 180  # metric windows, uploaded at the poll pace
TICK_S = 5.0
WAVES_GOOD, WAVES_BAD = "1%,100%", "1%,10%,100%"
SOAK, DEVICE_TIMEOUT = "2m", "15m"
GATES = ("error_rate<0.02 min=50", "fallback_rate<0.05 min=50")
REQUESTS_PER_S = 0.5  # each device's app load
ENROLL_PER_S = 40.0  # devices switched on per second at the start (a one-process SQLite server collapses under
# an unpaced burst of enrollments: see docs/simulator.md)


def scenario(devices: int, database: str, processes: int, workers: int = 0) -> Scenario:
    """The scale scenario (module docstring): timings of a real fleet, scaled to the machine time a run may take."""
    # a wave lasts at most two polls (released at the next poll, healthy at the poll after the soak) plus jitter
    wave_s = 2 * (POLL_S + JITTER_S) + 120
    return Scenario(
        name=f"fleet scale {devices} on {database}",
        server=ServerSpec(
            database=database,
            processes=processes,
            rollout_tick_s=TICK_S,
            telemetry_window_s=WINDOW_S,
            poll_interval_s=POLL_S,
            jitter_s=JITTER_S,
        ),  # fmt: skip
        fleet=FleetSpec(
            devices=devices,
            profiles={"pi4": 0.4, "pi5": 0.3, "orin-nano": 0.2, "x86": 0.1},
            requests_per_s=REQUESTS_PER_S,
            concurrency=8,
            enroll_per_s=ENROLL_PER_S,
        ),  # fmt: skip
        bundles=(BundleSpec(1), BundleSpec(2), BundleSpec(3, behaviour="errors", rate=0.2)),
        rollouts=(
            RolloutSpec(
                2, waves=WAVES_GOOD, gates=GATES, soak=SOAK, device_timeout=DEVICE_TIMEOUT, timeout_s=4 * wave_s + 600
            ),
            RolloutSpec(
                3,
                waves=WAVES_BAD,
                gates=GATES,
                soak=SOAK,
                device_timeout=DEVICE_TIMEOUT,
                timeout_s=3 * wave_s + 600,
                expect="rolled_back",
            ),
        ),  # fmt: skip
        faults=FaultSpec(),
        simulator=SimulatorSpec(workers=workers),
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
            "workers": result.workers, "ok": result.ok, "good_converged_s": _after(good, good.converged_s),
            "good_state": good.state, "bad_state": bad.state, "bad_decided_s": _after(bad, bad.decided_s),
            "bad_exposed_pct": 100 * bad.exposed / max(result.devices, 1),
            "polls_per_s": result.totals["polls_per_s"],
            "poll_p50_ms": result.totals["poll_p50_ms"], "poll_p99_ms": result.totals["poll_p99_ms"],
            "tick_p50_ms": result.server.get("rollout_tick_p50_ms"),
            "tick_p99_ms": result.server.get("rollout_tick_p99_ms"),
            "cpu_s": result.server.get("server_cpu_s"), "rss_mb": result.server.get("server_peak_rss_mb"),
            "sim_cpu_s": result.server.get("simulator_cpu_s"),
            "sim_rss_mb": result.server.get("simulator_peak_rss_mb"),
            "mb_down": result.totals["bytes_down"] / 1e6,
            "without": max(r.without_working_model for r in result.rollouts),
            "enrolled": result.enrolled, "duration_s": result.duration_s,
            "events": [what for _, what in result.events if "rollout" in what or "fault" in what][-12:]}  # fmt: skip


def _f(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]], load: tuple[float, float] | None, parallel: bool, note: str = "") -> str:
    together = "at the same time (each in its own process)" if parallel and len(rows) > 1 else "one after the other"
    if load is None:
        together = "as the note at the end of this paragraph says"
    lines = [
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
        f"({platform.machine()}), Python {platform.python_version()}, runs {together}, under `nice -n 10`; the "
        "simulator processes (devices as tasks on one event loop each, 8 worker threads each) and the server "
        f"processes share the machine with other work. Device timings of a real fleet: poll every {POLL_S} s "
        f"(jitter ±{JITTER_S} s; 10,000 devices then send what 100,000 polling every 30 minutes would), metric "
        f"windows of {WINDOW_S} s uploaded at that pace, {REQUESTS_PER_S} requests/s per device, enrollment paced at "
        f"{ENROLL_PER_S:g} devices/s, soak {SOAK}, "
        f"device timeout {DEVICE_TIMEOUT}, rollout tick {TICK_S:g} s. After enrollment and a one-wave rollout of "
        f"v1: a good v2 in waves `{WAVES_GOOD}`, then a bad v3 (errors on 20 % of requests, answered by the "
        f"cloud fallback as real agents do) in waves `{WAVES_BAD}`, both gated on `{'`, `'.join(GATES)}`. "
        f"Command: `nice -n 10 python benchmarks/fleet_scale.py {' '.join(sys.argv[1:])}`. {note}".rstrip(),
        "",
        "| database | server processes | devices | simulator processes | as expected | good v2 converged after "
        "| bad v3 | bad v3 stopped after | exposed to v3 | polls/s | poll p50 / p99 ms | rollout tick p50 / p99 ms "
        "| server CPU s | simulator CPU s | server peak RSS MB | MB downloaded | without a working model "
        "| run length |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['database']} | {r['processes']} | {r['devices']:,} | - | **no**: {r['error']} |"
                         + " - |" * 13)  # fmt: skip
            continue
        lines.append(
            f"| {r['database']} | {r['processes']} | {r['devices']:,} | {r['workers']} "
            f"| {'yes' if r['ok'] else '**no**'} | {_f(r['good_converged_s'])} s ({r['good_state']}) "
            f"| {r['bad_state']} | {_f(r['bad_decided_s'])} s "
            f"| {_f(r['bad_exposed_pct'], 2)} % | {_f(r['polls_per_s'], 1)} "
            f"| {_f(r['poll_p50_ms'], 1)} / {_f(r['poll_p99_ms'], 1)} "
            f"| {_f(r['tick_p50_ms'])} / {_f(r['tick_p99_ms'])} | {_f(r['cpu_s'])} | {_f(r['sim_cpu_s'])} "
            f"| {_f(r['rss_mb'])} | {_f(r['mb_down'], 1)} | {r['without']} | {_f(r['duration_s'] / 60)} min |"
        )
    largest = {db: max((r["devices"] for r in rows if r.get("ok") and r["database"] == db), default=0)
               for db in dict.fromkeys(r["database"] for r in rows)}  # fmt: skip
    reached = ", ".join(f"{db} {n:,} devices" if n else f"{db} none" for db, n in largest.items())
    lines += ["", f"Largest fleet that behaved as expected in this series: **{reached}**."]
    if load is not None:  # not known when the table is only remade from --include rows
        lines[-1] += f" Load average before / after: {load[0]:.1f} / {load[1]:.1f} (above 2: more work than cores)."
    return "\n".join(lines) + "\n"


def _parse_runs(text: str) -> list[tuple[str, int, int]]:
    runs = []
    for item in text.split(","):
        database, devices, processes = item.split(":")
        runs.append((database, int(devices), int(processes)))
    return runs


def run_one(spec: str, work: Path, out: Path) -> None:
    """One run (the ``--one`` child of ``--parallel``): its row as JSON in ``out``."""
    database, devices, processes = _parse_runs(spec)[0]
    started = time.monotonic()
    try:
        data = row(run(devices, database, processes, work))
    except Exception as e:  # noqa: BLE001 - the table says why the run did not finish
        data = {"database": database, "processes": processes, "devices": devices, "error": str(e)[:300]}
    except KeyboardInterrupt:
        minutes = (time.monotonic() - started) / 60
        data = {"database": database, "processes": processes, "devices": devices,
                "error": f"stopped by hand after {minutes:.0f} min"}  # fmt: skip
    out.write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="sqlite:10000:1,postgresql:10000:2")
    parser.add_argument("--parallel", action="store_true", help="run them at the same time, one process each")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--note", default="", help="a sentence for the table's header (how the runs went)")
    parser.add_argument("--include", type=Path, action="append", default=[],
                        help="a row (JSON) of an earlier run to show first in the table (repeatable)")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="edgefleet-fleet-scale-"))
    if args.one:
        run_one(args.one, work, args.row_out)
        return
    load_before = os.getloadavg()[0]
    specs = [spec for spec in args.runs.split(",") if spec]  # none: only the table of the --include rows
    children: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
    done = {i - len(args.include): json.loads(path.read_text()) for i, path in enumerate(args.include)}
    runs = len(done)

    def collect() -> None:
        for i, (child, out) in children.items():
            if i in done or child.poll() is None:
                continue
            database, devices, processes = _parse_runs(specs[i])[0]
            failed = {"database": database, "processes": processes, "devices": devices,
                      "error": f"the run exited with {child.returncode}"}  # fmt: skip
            done[i] = json.loads(out.read_text()) if out.exists() else failed
            text = table([done[k] for k in sorted(done)], (load_before, os.getloadavg()[0]), args.parallel, args.note)
            write_section("fleet_scale", "Fleet scale: simulated devices against real fleet servers", text)

    for i, spec in enumerate(specs):
        out = work / f"row-{i}.json"
        command = [sys.executable, __file__, "--one", spec, "--work-dir", str(work), "--row-out", str(out)]
        children[i] = (subprocess.Popen(command), out)  # noqa: S603 - this script
        while not args.parallel and i not in done:
            collect()
            time.sleep(5)
    while len(done) < runs + len(children):
        collect()
        time.sleep(5)
    load = (load_before, os.getloadavg()[0]) if specs else None
    text = table([done[k] for k in sorted(done)], load, args.parallel, args.note)
    write_section("fleet_scale", "Fleet scale: simulated devices against real fleet servers", text)
    print(text)


if __name__ == "__main__":
    main()

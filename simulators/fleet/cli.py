"""``edgefleet-sim``: run a scenario file against real fleet server(s) and write its report.

    edgefleet-sim run simulators/scenarios/good-rollout.toml --devices 200 --out sim-report/
    edgefleet-sim run simulators/scenarios/good-rollout.toml --devices 10000 --workers 2
    edgefleet-sim check my-scenario.toml

Exit status: 0 when every rollout ended as the scenario expects and the fleet converged with no
device left without a working model; 1 when it did not (the summary says which); 2 for a bad
scenario or a simulation that could not run (one line on stderr).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bundles.errors import ConfigError, EdgeFleetError
from simulators.fleet.scenario import Scenario, load_scenario

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Simulate a fleet against a real fleet server.")
console = Console()


def _load(path: Path, devices: int | None, database: str | None, processes: int | None,
          workers: int | None = None) -> Scenario:  # fmt: skip
    scenario = load_scenario(path)
    if workers is not None:
        scenario = dataclasses.replace(scenario, simulator=dataclasses.replace(scenario.simulator, workers=workers))
    fleet = scenario.fleet if devices is None else dataclasses.replace(scenario.fleet, devices=devices)
    server = scenario.server
    if database is not None:
        server = dataclasses.replace(server, database=database)
    if processes is not None:
        server = dataclasses.replace(server, processes=processes)
    scenario = dataclasses.replace(scenario, fleet=fleet, server=server)
    from simulators.fleet.scenario import check

    check(scenario)
    return scenario


@app.command()
def run(
    scenario_file: Annotated[Path, typer.Argument(help="Scenario TOML file.")],
    out: Annotated[Path, typer.Option(help="Report directory (report.html, timeline.png, report.json).")] = Path(
        "sim-report"
    ),
    devices: Annotated[int | None, typer.Option(help="Override [fleet] devices.")] = None,
    database: Annotated[str | None, typer.Option(help="Override [server] database: sqlite or postgresql.")] = None,
    processes: Annotated[int | None, typer.Option(help="Override [server] processes.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Override [simulator] workers: simulator processes (0: from the core count).")
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="Where devices and servers keep state (default: a temp dir).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress display.")] = False,
) -> None:
    """Run the scenario, print the summary and write the report."""
    from simulators.fleet.report import print_summary, write_report
    from simulators.fleet.runner import Simulation

    try:
        scenario = _load(scenario_file, devices, database, processes, workers)
        base = work_dir or Path(tempfile.mkdtemp(prefix="edgefleet-sim-"))
        result = Simulation(scenario, base / "run", console=console, progress=not quiet).run()
    except (ConfigError, EdgeFleetError) as e:
        print(f"edgefleet-sim: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    print_summary(result, console)
    html = write_report(result, out)
    console.print(f"report: {html}")
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def check(scenario_file: Annotated[Path, typer.Argument(help="Scenario TOML file.")]) -> None:
    """Check a scenario file without running it."""
    try:
        scenario = load_scenario(scenario_file)
    except ConfigError as e:
        print(f"edgefleet-sim: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    console.print(f"{scenario.name}: {scenario.fleet.devices} devices, {len(scenario.rollouts)} rollout(s): ok")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

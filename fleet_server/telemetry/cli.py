"""``edgefleet-server drift`` and ``edgefleet-server telemetry ...`` on the server's database.

    edgefleet-server drift digits                   # PSI per feature and output, per version (last hour)
    edgefleet-server drift digits --since 24h --evaluate
    edgefleet-server telemetry alerts [--model digits] [--all]
    edgefleet-server telemetry monitor digits --warn 0.15 --alert 0.3
    edgefleet-server telemetry summary digits --by device
    edgefleet-server telemetry export-samples samples.parquet --model digits --reason fallback
    edgefleet-server telemetry prune --samples-days 30

``fleet_server.cli`` registers :func:`drift` and :data:`app` (as ``telemetry``) once; the shared
pieces (data directory, sessions, output, durations) come from :mod:`fleet_server.cli_common`.
Errors print one line and exit 1, like every ``edgefleet-server`` command.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fleet_server.cli_common import DataDir, JsonOut, console, db_session, duration_s, print_json, whole_seconds
from fleet_server.telemetry import monitors, query
from fleet_server.telemetry.api import MAX_LOOKBACK_S

app = typer.Typer(help="Fleet telemetry: summaries, drift monitors and alerts, sampled logs.", no_args_is_help=True)
SinceOpt = Annotated[str, typer.Option("--since", help="Look back this far: 30m, 12h, 7d, 2w.")]


def _since(text: str) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=duration_s("--since", text))


def drift(
    model: Annotated[str, typer.Argument(help="Model name.")],
    since: SinceOpt = "1h",
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Also record alerts (as the server does).")] = False,
    data_dir: DataDir = None,
    as_json: JsonOut = False,
) -> None:
    """PSI per feature and for the output, per version, against the bundle's training baseline."""
    with db_session(data_dir) as (session, _):
        settings = monitors.monitor_settings(session, model)
        versions = monitors.drift_by_version(session, model, _since(since), dt.datetime.now(dt.timezone.utc))
        alerts = monitors.evaluate(session, model) if evaluate else monitors.list_alerts(session, model)
        if as_json:
            print_json({"monitor": settings.to_dict(), "versions": [v.to_dict() for v in versions],
                         "alerts": [monitors.alert_dict(a) for a in alerts]})  # fmt: skip
            return
        _print_drift(model, settings, versions)
        _print_alerts([monitors.alert_dict(a) for a in alerts])


def _print_drift(model: str, settings: monitors.MonitorSettings, versions: list[monitors.VersionDrift]) -> None:
    source = "override" if settings.overridden else "defaults"
    console.print(f"{model}: warn at PSI {settings.warn_psi}, alert at {settings.alert_psi} ({source})")
    if not versions:
        console.print("no metric windows in this period")
        return
    for version in versions:
        table = Table(title=f"{model}@{version.version}  ({version.rows} rows)")
        for column in ("feature", "psi", "level"):
            table.add_column(column)
        for feature, value in sorted(version.psi.items(), key=lambda kv: -kv[1]):
            table.add_row(feature, f"{value:.4f}", version.levels.get(feature, "ok"))
        console.print(table)


def _print_alerts(alerts: list[dict[str, Any]]) -> None:
    if not alerts:
        console.print("no open drift alerts")
        return
    table = Table(title="drift alerts")
    for column in ("id", "bundle", "feature", "level", "psi", "threshold", "rows", "opened", "resolved"):
        table.add_column(column)
    for a in alerts:
        table.add_row(str(a["id"]), f"{a['model']}@{a['version']}", a["feature"], a["level"], f"{a['psi']:.3f}",
                      str(a["threshold"]), str(a["rows"]), _short_time(a["opened_at"]),
                      _short_time(a["resolved_at"]))  # fmt: skip
    console.print(table)


def _short_time(iso: str | None) -> str:
    """``2026-11-29T12:58:03.1+00:00`` -> ``11-29 12:58`` (UTC), empty for None."""
    return "" if not iso else f"{iso[5:10]} {iso[11:16]}"


@app.command("alerts")
def alerts_command(
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    include_resolved: Annotated[bool, typer.Option("--all", help="Include resolved alerts.")] = False,
    data_dir: DataDir = None,
    as_json: JsonOut = False,
) -> None:
    """Drift alerts, newest first (open ones unless --all)."""
    with db_session(data_dir) as (session, _):
        rows = [monitors.alert_dict(a) for a in monitors.list_alerts(session, model, open_only=not include_resolved)]
    if as_json:
        print_json(rows)
    else:
        _print_alerts(rows)


@app.command("monitor")
def monitor_command(
    model: Annotated[str, typer.Argument(help="Model name.")],
    warn: Annotated[float | None, typer.Option("--warn", help="PSI warn level (default 0.1).")] = None,
    alert: Annotated[float | None, typer.Option("--alert", help="PSI alert level (default 0.25).")] = None,
    lookback: Annotated[str | None, typer.Option("--lookback", help="Evaluation period, e.g. 1h.")] = None,
    min_rows: Annotated[int | None, typer.Option("--min-rows", help="Rows needed before PSI counts.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Show, or override with options, the drift thresholds of a model."""
    lookback_s = None if lookback is None else whole_seconds("--lookback", lookback, 1, MAX_LOOKBACK_S)
    with db_session(data_dir) as (session, _):
        if warn is None and alert is None and lookback_s is None and min_rows is None:
            settings = monitors.monitor_settings(session, model)
        else:
            settings = monitors.set_monitor(session, model, warn, alert, lookback_s, min_rows)
    print_json(settings.to_dict())


@app.command("summary")
def summary_command(
    model: Annotated[str, typer.Argument(help="Model name.")],
    by: Annotated[str, typer.Option("--by", help="version, device, variant or fleet.")] = "version",
    since: SinceOpt = "1h",
    data_dir: DataDir = None,
    as_json: JsonOut = False,
) -> None:
    """Requests, errors, fallback rate, latency p95/p99 and PSI per version, per device or fleet-wide."""
    with db_session(data_dir) as (session, _):
        rows = query.summarize(session, model, _since(since), by=by)
    if as_json:
        print_json(rows)
        return
    columns = {"version": "version", "device_id": "device", "devices_reporting": "devices", "requests": "requests",
               "error_rate": "errors", "fallback_rate": "fallbacks", "latency_p95_ms": "p95 ms",
               "latency_p99_ms": "p99 ms", "psi_max_input": "psi in", "psi_output": "psi out"}  # fmt: skip
    table = Table(title=f"{model} by {by}")
    shown = [c for c in columns if any(c in r for r in rows)]
    for column in shown:
        table.add_column(columns[column])
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in shown))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command("export-samples")
def export_samples_command(
    out: Annotated[Path, typer.Argument(help="Parquet file to write.")],
    model: Annotated[str | None, typer.Option("--model")] = None,
    version: Annotated[int | None, typer.Option("--version")] = None,
    device_id: Annotated[str | None, typer.Option("--device")] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="rate, error, fallback, low_confidence.")] = None,
    since: SinceOpt = "7d",
    data_dir: DataDir = None,
) -> None:
    """Write sampled prediction logs to Parquet (weights: 1 / inclusion_probability)."""
    with db_session(data_dir) as (session, _):
        where = query.SampleFilter(model, version, device_id, reason, _since(since), None)
        rows = query.samples(session, where, limit=10_000_000)
        count = query.samples_to_parquet(rows, str(out))
    console.print(f"{count} samples written to {out}")


@app.command("prune")
def prune_command(
    windows_days: Annotated[int, typer.Option(min=1)] = 90,
    samples_days: Annotated[int, typer.Option(min=1)] = 30,
    events_days: Annotated[int, typer.Option(min=1)] = 365,
    data_dir: DataDir = None,
) -> None:
    """Delete raw telemetry older than the retention limits."""
    with db_session(data_dir) as (session, _):
        deleted = query.prune(session, query.Retention(windows_days, samples_days, events_days))
    print_json(deleted)

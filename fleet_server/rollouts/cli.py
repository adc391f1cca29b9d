"""``edgefleet-server rollout ...``: create, watch and steer rollouts from the server host.

Like the rest of ``edgefleet-server``, these commands work on the server's database directly (the
settings of ``--data-dir``) and audit every change as ``cli:<unix user>``; the running server's
evaluation loop picks changes up on its next tick (``rollout evaluate`` runs one now). Errors print
one line and exit 1 (the shared pieces are in :mod:`fleet_server.cli_common`; ``fleet_server.cli``
registers :data:`app` as ``rollout``).

    edgefleet-server rollout create digits@3 --to group:lab --waves 1%,10%,50%,100% \\
        --soak 30m --gate "error_rate<0.01" --gate "p99_ms<40" --gate "psi<0.2" --on-breach rollback
    edgefleet-server rollout show 17
    edgefleet-server rollout approve|pause|resume|abort|rollback 17
    edgefleet-server rollout pin digits@2 --to group:lab
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.cli_common import (
    DataDir,
    JsonOut,
    actor,
    console,
    db_session,
    duration_s,
    guarded,
    print_json,
    settings_for,
)
from fleet_server.rollouts import service
from fleet_server.rollouts.spec import DEFAULT_WAVES, RolloutPolicy, parse_bundle_ref, parse_waves

app = typer.Typer(help="Staged, gated rollouts of a bundle across the fleet.", no_args_is_help=True)
Targets = Annotated[list[str], typer.Option("--to", help="all, group:NAME, filter:NAME, where:EXPR or device:ID.")]


@app.command("create")
def create(
    bundle: Annotated[str, typer.Argument(help="NAME@VERSION, e.g. digits@3.")],
    to: Targets,
    waves: Annotated[
        str, typer.Option(help="Cumulative shares or counts; ':shadow' for a shadow wave.")
    ] = DEFAULT_WAVES,
    gate: Annotated[list[str] | None, typer.Option("--gate", help='Repeatable, e.g. "error_rate<0.01".')] = None,
    soak: Annotated[str, typer.Option(help="How long each device must run the bundle healthily.")] = "30m",
    device_timeout: Annotated[str, typer.Option(help="Grace after the soak before a silent device fails.")] = "1h",
    on_breach: Annotated[str, typer.Option(help="rollback or pause.")] = "rollback",
    approval: Annotated[str, typer.Option(help="none, start or each_wave.")] = "none",
    max_downloads: Annotated[int | None, typer.Option(help="Max concurrent downloads per wave.")] = None,
    jitter: Annotated[str, typer.Option(help="Spread of devices' download start times.")] = "60s",
    prefer: Annotated[
        list[str] | None,
        typer.Option(
            "--prefer", help="Repeatable variant preference ranked before each device's own (tflite, onnx:int8-static)."
        ),
    ] = None,
    draft: Annotated[bool, typer.Option("--draft", help="Create without starting ('rollout start' later).")] = False,
    data_dir: DataDir = None,
    as_json: JsonOut = False,
) -> None:
    """Create a rollout of a bundle to a target set; it starts at once unless --draft or approval is needed."""
    model, version = guarded(lambda: parse_bundle_ref(bundle))
    durations_s = {"soak_s": duration_s("--soak", soak), "device_timeout_s": duration_s("--device-timeout",
                   device_timeout), "jitter_s": duration_s("--jitter", jitter)}  # fmt: skip
    policy = guarded(
        lambda: RolloutPolicy(
            waves=parse_waves(waves),
            gates=tuple(gate or ()),
            on_breach=on_breach,
            approval=approval,
            max_concurrent_downloads=max_downloads,
            variant_preferences=tuple(prefer or ()),
            **durations_s,
        )  # fmt: skip
    )
    with db_session(data_dir) as (session, _):
        rollout = service.create_rollout(
            session, service.CreateRequest(model, version, tuple(to), policy, draft), actor()
        )
        view = _describe(session, rollout.id)
    _print(view, as_json)  # after the commit: a broken pipe while printing must not undo the rollout


@app.command("list")
def list_rollouts(
    state: Annotated[str | None, typer.Option(help="Only rollouts in this state.")] = None,
    model: Annotated[str | None, typer.Option(help="Only rollouts of this model.")] = None,
    data_dir: DataDir = None,
    as_json: JsonOut = False,
) -> None:
    """Rollouts, newest first."""
    from fleet_server.rollouts.models import Rollout
    from fleet_server.rollouts.views import summarise_rollout

    with db_session(data_dir) as (session, _):
        query = select(Rollout).order_by(Rollout.id.desc())
        query = query.where(Rollout.state == state) if state else query
        query = query.where(Rollout.model_name == model) if model else query
        rows = [summarise_rollout(r) for r in session.scalars(query)]
    if as_json:
        print_json(rows)
        return
    table = Table()
    for column in ("id", "bundle", "state", "wave", "targets", "created_by"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["id"]), r["bundle"], r["state"], str(r["current_wave"] + 1), " ".join(r["targets"]),
                      r["created_by"])  # fmt: skip
    console.print(table)


@app.command("show")
def show(
    rollout_id: int,
    devices: Annotated[bool, typer.Option("--devices", help="Also list every device's progress.")] = False,
    data_dir: DataDir = None,
    as_json: JsonOut = False,
) -> None:
    """Waves, cohort progress, gate values and decision records of a rollout."""
    with db_session(data_dir) as (session, _):
        view = _describe(session, rollout_id, devices)
    _print(view, as_json)


def _control(action: str, rollout_id: int, data_dir: Path | None, as_json: bool) -> None:
    with db_session(data_dir) as (session, _):
        service.act(session, rollout_id, action, actor())
        view = _describe(session, rollout_id)
    if as_json:
        print_json(view)
        return
    last = view["decisions"][-1]
    console.print(f"rollout {rollout_id}: {last['from_state']} -> {last['to_state']} ({last['reason']})", markup=False)


@app.command("start")
def start(rollout_id: int, data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """Start a draft rollout."""
    _control("start", rollout_id, data_dir, as_json)


@app.command("approve")
def approve(rollout_id: int, data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """Approve the next wave (or accept the current wave over a paused gate decision)."""
    _control("approve", rollout_id, data_dir, as_json)


@app.command("pause")
def pause(rollout_id: int, data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """Pause: no new wave starts and no device is released until resume."""
    _control("pause", rollout_id, data_dir, as_json)


@app.command("resume")
def resume(rollout_id: int, data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """Resume a paused rollout (its gates are evaluated again)."""
    _control("resume", rollout_id, data_dir, as_json)


@app.command("abort")
def abort(rollout_id: int, data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """Stop the rollout; devices keep what they have (use rollback to restore them)."""
    _control("abort", rollout_id, data_dir, as_json)


@app.command("rollback")
def rollback(rollout_id: int, data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """Direct every device the rollout touched back to the bundle it ran before."""
    _control("rollback", rollout_id, data_dir, as_json)


@app.command("evaluate")
def evaluate(rollout_id: int, data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """Run one evaluation now instead of waiting for the server's loop."""
    from fleet_server.db import make_engine, make_session_factory
    from fleet_server.rollouts.engine import RolloutEngine

    settings = settings_for(data_dir)
    engine = make_engine(settings.resolved_database_url)
    try:
        RolloutEngine(make_session_factory(engine)).tick_one(rollout_id)
    finally:
        engine.dispose()
    show(rollout_id, data_dir=data_dir, as_json=as_json)


@app.command("pin")
def pin(
    bundle: Annotated[str, typer.Argument(help="NAME@VERSION to hold the devices on.")],
    to: Targets,
    data_dir: DataDir = None,
) -> None:
    """Pin devices (or a group, a filter) to a version; rollouts leave them alone until unpinned."""
    model, version = guarded(lambda: parse_bundle_ref(bundle))
    with db_session(data_dir) as (session, _):
        result = service.pin(session, model, version, to, actor())
    console.print(f"pinned {len(result['pinned'])} device(s) to {bundle}")
    for item in result["not_pinned"]:
        console.print(f"  not pinned {item['device_id']}: {item['reason']}", markup=False)


@app.command("unpin")
def unpin(model: str, to: Targets, data_dir: DataDir = None) -> None:
    """Lift pins of a model (devices keep their version until a rollout moves them)."""
    with db_session(data_dir) as (session, _):
        result = service.unpin(session, model, to, actor())
    console.print(f"unpinned {len(result['unpinned'])} device(s)")


def _describe(session: Session, rollout_id: int, with_devices: bool = False) -> dict[str, Any]:
    from fleet_server.rollouts.views import describe_rollout

    return describe_rollout(session, service.get_rollout(session, rollout_id), with_devices)


def _print(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(view)
        return
    policy = view["policy"]
    console.print(f"rollout {view['id']}  {view['bundle']}  [bold]{view['state']}[/bold]  "
                  f"targets {' '.join(view['targets'])}  by {view['created_by']}")  # fmt: skip
    console.print(f"soak {policy['soak_s']:g} s, device timeout {policy['device_timeout_s']:g} s, on breach "
                  f"{policy['on_breach']}, approval {policy['approval']}, gates: {', '.join(policy['gates']) or '-'}",
                  markup=False)  # fmt: skip
    console.print(_waves_table(view["waves"]))
    for wave in view["waves"]:
        if wave["gates"]:
            console.print(_gates_table(wave))
    for out in view["not_in_rollout"]:
        console.print(f"  {out['membership']}: {out['device_id']}: {out['reason']}", markup=False)
    console.print(_decisions_table(view["decisions"]))
    if "device_detail" in view:
        console.print(_devices_table(view["device_detail"]))


def _waves_table(waves: list[dict[str, Any]]) -> Table:
    table = Table(title="waves")
    for column in ("wave", "spec", "state", "devices", "released", "installing", "soaking", "healthy", "failed",
                   "timed out", "last evaluation"):  # fmt: skip
        table.add_column(column)
    for w in waves:
        o = w["outcomes"]
        table.add_row(str(w["number"]), w["spec"], w["state"], str(w["devices"]), str(w["released"]),
                      *(str(o.get(k, 0)) for k in ("installing", "soaking", "healthy", "failed", "timed_out")),
                      w["last_evaluation"] or "")  # fmt: skip
    return table


def _gates_table(wave: dict[str, Any]) -> Table:
    table = Table(title=f"wave {wave['number']} gates (evaluated {wave['evaluated_at']})")
    for column in ("gate", "status", "value", "threshold", "sample", "min", "previous version", "why"):
        table.add_column(column)
    for g in wave["gates"]:
        table.add_row(g["gate"], g["status"], _num(g["value"]), _num(g["threshold"]), str(g["sample"]),
                      str(g["min_samples"]), _num(g["control_value"]), g["reason"])  # fmt: skip
    return table


def _decisions_table(decisions: list[dict[str, Any]]) -> Table:
    table = Table(title="decisions")
    for column in ("at", "actor", "action", "wave", "state", "reason"):
        table.add_column(column)
    for d in decisions:
        table.add_row(d["at"], d["actor"], d["action"], "" if d["wave"] is None else str(d["wave"]),
                      f"{d['from_state']} -> {d['to_state']}", d["reason"])  # fmt: skip
    return table


def _devices_table(devices: list[dict[str, Any]]) -> Table:
    table = Table(title="devices")
    for column in ("device", "wave", "variant", "previous", "start after", "outcome", "why"):
        table.add_column(column)
    for d in devices:
        table.add_row(d["device_id"], str(d["wave"]), d["variant"] or "", str(d["previous_version"] or ""),
                      d["start_after"] or "", d["outcome"], d["outcome_reason"])  # fmt: skip
    return table


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"

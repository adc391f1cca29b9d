"""The simulation's report: a summary table in the terminal, and report.json, timeline.png, report.html.

The timeline plot has one panel of devices per version over time (with the rollouts' decisions as
vertical lines), one of device states (installing, offline, power_off ...), and one of the cumulative
bytes downloaded and polls. The HTML page embeds the PNG (base64) and the tables, so it is one
self-contained file to attach to a ticket.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from simulators.fleet.runner import RolloutOutcome, SimulationResult


def _gates(outcome: RolloutOutcome) -> list[dict[str, Any]]:
    """The gate figures of the last decision that evaluated gates."""
    for decision in reversed(outcome.decisions):
        gates = (decision.get("record") or {}).get("gates")
        if gates:
            return list(gates)
    return []


def rollout_rows(result: SimulationResult) -> list[dict[str, Any]]:
    rows = []
    for r in result.rollouts:
        rows.append({
            "rollout": r.label, "id": r.rollout_id, "expected": r.expect, "state": r.state,
            "decided_s": None if r.decided_s is None else round(r.decided_s - r.started_s, 1),
            "converged_s": None if r.converged_s is None else round(r.converged_s - r.started_s, 1),
            "exposed": r.exposed, "exposed_pct": round(100 * r.exposed / max(result.devices, 1), 2),
            "without_working_model": r.without_working_model, "ok": r.ok,
            "decisions": [f"{d.get('action')} (wave {d.get('wave')}): {str(d.get('reason', ''))[:160]}"
                          for d in r.decisions],
            "gates": [{k: g.get(k) for k in ("gate", "status", "value", "control_value", "sample")} for g in _gates(r)],
        })  # fmt: skip
    return rows


def print_summary(result: SimulationResult, console: Console) -> None:
    table = Table(title=f"{result.scenario}: {result.devices} devices, {result.database}, "
                        f"{result.processes} server process(es), {result.workers} simulator process(es), "
                        f"{result.duration_s:.0f} s")  # fmt: skip
    for column in ("rollout", "expected", "ended", "decided after", "converged after", "exposed", "no working model"):
        table.add_column(column)
    for row in rollout_rows(result):
        style = "green" if row["ok"] else "red"
        table.add_row(row["rollout"], row["expected"], f"[{style}]{row['state']}[/]", _s(row["decided_s"]),
                      _s(row["converged_s"]), f"{row['exposed']} ({row['exposed_pct']}%)",
                      str(row["without_working_model"]))  # fmt: skip
    console.print(table)
    t, s = result.totals, result.server
    figures = Table(title="traffic and server", show_header=False)
    for key, value in (
        ("polls/s", f"{t['polls_per_s']:.1f} ({t['polls']:.0f} polls, {t['not_modified']:.0f} answered 304)"),
        ("poll latency p50 / p99", f"{t['poll_p50_ms']:.1f} / {t['poll_p99_ms']:.1f} ms"),
        ("bytes down / up", f"{t['bytes_down'] / 1e6:.1f} MB / {t['bytes_up'] / 1e6:.1f} MB"),
        ("requests served, error rate, fallback rate",
         f"{t['requests']:.0f}, {t['error_rate']:.2%}, {t['fallback_rate']:.2%}"),
        ("installs (failed), power losses",
         f"{t['installs']:.0f} ({t['install_failures']:.0f}), {t['power_losses']:.0f}"),
        ("injected network faults, refused by TUF", f"{t['injected_faults']:.0f}, {t['trust_errors']:.0f}"),
        ("rollout tick p50 / p99", f"{s.get('rollout_tick_p50_ms', 0):.0f} / {s.get('rollout_tick_p99_ms', 0):.0f} ms"),
        ("server CPU, peak RSS", f"{s.get('server_cpu_s', 0):.0f} CPU-s, {s.get('server_peak_rss_mb', 0):.0f} MB"),
        ("simulator CPU, peak RSS",
         f"{s.get('simulator_cpu_s', 0):.0f} CPU-s, {s.get('simulator_peak_rss_mb', 0):.0f} MB"),
    ):  # fmt: skip
        figures.add_row(key, value)
    console.print(figures)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def write_report(result: SimulationResult, out_dir: Path) -> Path:
    """Write report.json, timeline.png and report.html into ``out_dir``; returns the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "scenario": result.scenario, "devices": result.devices, "enrolled": result.enrolled,
        "database": result.database, "processes": result.processes, "workers": result.workers,
        "duration_s": round(result.duration_s, 1),
        "ok": result.ok, "rollouts": rollout_rows(result), "totals": result.totals, "server": result.server,
        "events": result.events, "timeline": [dataclasses.asdict(s) for s in result.timeline],
    }  # fmt: skip
    (out_dir / "report.json").write_text(json.dumps(data, indent=1, default=str))
    png = plot_timeline(result, out_dir / "timeline.png")
    page = out_dir / "report.html"
    page.write_text(_html(data, png))
    return page


def plot_timeline(result: SimulationResult, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    samples = result.timeline
    if not samples:
        return None
    t = [s.t_s for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    for key in sorted({k for s in samples for k in s.versions}):
        axes[0].plot(t, [s.versions.get(key, 0) for s in samples], label=key)
    axes[0].set_ylabel("devices per version")
    for key in sorted({k for s in samples for k in s.states} - {"idle"}):
        axes[1].plot(t, [s.states.get(key, 0) for s in samples], label=key)
    axes[1].set_ylabel("devices per state")
    axes[2].plot(t, [s.bytes_down / 1e6 for s in samples], label="MB downloaded")
    polls = [s.polls for s in samples]
    rates = [(b - a) / max(t2 - t1, 1e-9) for a, b, t1, t2 in zip(polls, polls[1:], t, t[1:], strict=False)]
    axes[2].plot(t, [0.0, *rates], label="polls/s")
    _plot_gates(axes[3], samples)
    axes[3].set_xlabel("seconds since the simulation started")
    for at, what in result.events:
        for ax in axes:
            ax.axvline(at, color="grey", alpha=0.25, linewidth=0.8)
        if "rollout" in what and ("rolled_back" in what or "completed" in what or "created" in what):
            axes[0].annotate(what.split(":")[0] + ": " + what.split(":")[1][:22], (at, 0), rotation=90, fontsize=7,
                             va="bottom", alpha=0.7)  # fmt: skip
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.scenario}: {result.devices} devices on {result.database}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


_GATE = re.compile(r"^\s*[a-z0-9_]+\s*(<=|>=|<|>)\s*([0-9.eE+-]+)")


def _plot_gates(ax: Any, samples: list[Any]) -> None:
    """Each gate's value over time as a share of its threshold (1.0: the threshold; dashed)."""
    for key in sorted({k for s in samples for k in s.gates}):
        match = _GATE.match(key.split(": ", 1)[-1])
        threshold = float(match.group(2)) if match else 0.0
        if not threshold:
            continue
        points = [(s.t_s, s.gates[key] / threshold) for s in samples if key in s.gates]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", markersize=3, label=key)
    ax.axhline(1.0, color="red", linestyle="--", linewidth=1)
    ax.set_ylabel("gate value / threshold")


def _html(data: dict[str, Any], png: Path | None) -> str:
    image = ""
    if png is not None:
        image = f'<img alt="timeline" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in
                         ("rollout", "expected", "state", "decided_s", "converged_s", "exposed", "exposed_pct",
                          "without_working_model")) + "</tr>"
        for r in data["rollouts"]
    )  # fmt: skip
    decisions = "".join(_decisions_html(r) for r in data["rollouts"])
    figures = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>"
                      for k, v in {**data["totals"], **data["server"]}.items())  # fmt: skip
    events = "".join(f"<li>{at:.1f} s: {html.escape(what)}</li>" for at, what in data["events"])
    title = html.escape(data["scenario"])
    verdict = "as expected" if data["ok"] else "NOT as expected"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgefleet-sim: {title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>edgefleet-sim: {html.escape(data["scenario"])}</h1>
<p>{data["devices"]} devices ({data["enrolled"]} enrolled), {html.escape(data["database"])},
{data["processes"]} server process(es), {data["duration_s"]} s. Verdict: <b>{verdict}</b></p>
<h2>Rollouts</h2><table><tr><th>rollout</th><th>expected</th><th>ended</th><th>decided after (s)</th>
<th>converged after (s)</th><th>exposed</th><th>exposed %</th><th>without a working model</th></tr>{rows}</table>
<h2>Timeline</h2>{image}<h2>Decisions and gates</h2>{decisions}
<h2>Traffic and server</h2><table>{figures}</table><h2>Events</h2><ul>{events}</ul></body></html>
"""


def _decisions_html(r: dict[str, Any]) -> str:
    items = "".join(f"<li>{html.escape(d)}</li>" for d in r["decisions"])
    keys = ("gate", "status", "value", "control_value", "sample")
    gates = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(g.get(k)))}</td>" for k in keys) + "</tr>" for g in r["gates"]
    )
    header = "<tr><th>gate</th><th>status</th><th>value</th><th>control</th><th>sample</th></tr>"
    return f"<h3>{html.escape(r['rollout'])}</h3><ul>{items}</ul><table>{header}{gates}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)

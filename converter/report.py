"""Conversion reports: a Markdown and an HTML page with a size / metric / latency plot, and the rich table.

The report is written after the conversion is recorded, to ``reports/<name>/<version>/conversion-<n>/``
(``report.md``, ``report.html`` with the plot embedded, ``plot.png``). It lists every rung: the
refused ones with the reasons and numbers that refused them (those refused before they could be
measured, "nothing to quantise", in a section of their own and under the plot), the kept ones
with the findings they were kept despite (``--prefer size``). Error metrics say "lower is better".
Latencies are medians over all timed calls with the range of the round medians beside them (the
spread over repeated runs). Each variant's runtimes say where it ran and how it fared there
(LiteRT and tflite-runtime for TFLite); *structural* variants (Core ML off macOS) are listed,
never plotted as measured. A section compares every executed variant on every runtime with the
source and with each other (:mod:`converter.agreement`, with its heat map). Every plot panel
draws its budget: the size of the fp32 parent (and ``--max-size-bytes``), the least metric value
the drop budget allows, the fp32 parent's latency times the allowed ratio (and
``--max-latency-ms`` at batch 1). Reports are for people: unlike the
bundle they carry timings and memory figures, so two runs' reports differ.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from converter.agreement import markdown_lines as agreement_lines
from converter.agreement import plot_png as agreement_plot
from converter.home import Home, publish_dir, staging_dir
from converter.metrics import metric
from converter.registry import Conversion, ModelVersion
from converter.spec import ModelSpec

_COLUMNS = ("variant", "status", "runtimes", "size", "x fp32 size", "{metric}", "drop", "max err", "top-1",
            "p50 b1 ms (range)", "p50 batch ms (range)", "x fp32 time b1 / batch", "why refused / notes")  # fmt: skip


def metric_title(spec: ModelSpec) -> str:
    """The metric's name, with "(lower is better)" for error metrics."""
    name = spec.metric_name
    return name if metric(name).higher_is_better else f"{name} (lower is better)"


def columns(spec: ModelSpec) -> tuple[str, ...]:
    return tuple(c.format(metric=metric_title(spec)) for c in _COLUMNS)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return (
            f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
        )
    return str(value)


def _size(value: Any) -> str:
    return "-" if value is None else f"{value / 1024:.1f} KiB"


def _latency(metrics: dict[str, Any], label: str) -> str:
    """``0.041 (0.039-0.046)``: the median and the range of the round medians."""
    median = metrics.get(f"latency_{label}_p50_ms")
    spread = metrics.get(f"latency_{label}_p50_range_ms")
    if median is None:
        return "-"
    return _fmt(median, 3) + (f" ({_fmt(spread[0], 3)}-{_fmt(spread[1], 3)})" if spread else "")


def _ratios(metrics: dict[str, Any]) -> str:
    b1, batch = metrics.get("latency_ratio_b1_to_fp32"), metrics.get("latency_ratio_to_fp32")
    if b1 is None and batch is None:
        return "-"
    return f"{_fmt(b1, 3)} / {_fmt(batch, 3)}" if b1 is not None else _fmt(batch, 3)


def _runtimes(result: dict[str, Any]) -> str:
    """``litert 2.3.0 passed, tflite_runtime 2.14.0 refused``: where the variant ran and how it fared."""
    entries = result.get("runtimes") or {}
    return ", ".join(f"{name} {e.get('version', '')} {e.get('status', '')}".replace("  ", " ")
                     for name, e in entries.items()) or "-"  # fmt: skip


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row of strings per rung, in :func:`columns` order."""
    out = []
    for r in results:
        m = r["metrics"]
        name = r["variant_id"] + (" *" if m.get("preferred") else "")
        why = "; ".join(r["reasons"] + r.get("notes", []))
        out.append([
            name, r["status"], _runtimes(r), _size(m.get("size_bytes")), _fmt(m.get("size_ratio_to_fp32"), 3),
            _fmt(m.get("metric_value")), _fmt(m.get("metric_drop")), _fmt(m.get("max_abs_error"), 3),
            _fmt(m.get("top1_agreement")), _latency(m, "b1"), _latency(m, "batch"), _ratios(m), why,
        ])  # fmt: skip
    return out


def not_measured(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rungs refused before they could be measured (a recipe that does not apply, a file the runtime refuses)."""
    return [r for r in results if r["metrics"].get("size_bytes") is None]


def rich_table(model: ModelVersion, results: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{model.ref}: variants ({metric_title(model.spec)}; * = the ladder's choice)")
    for column in columns(model.spec):
        table.add_column(column, overflow="fold", max_width=60 if column.startswith("why") else None)
    for row in rows(results):
        style = {"passed": "green", "structural": "yellow"}.get(row[1], "red")
        table.add_row(*row, style=style)
    return table


def markdown(model: ModelVersion, conversion: Conversion, agreement: dict[str, Any] | None = None) -> str:
    spec = model.spec
    header = columns(spec)
    readout = f"; the metric reads {spec.readout.describe()}" if spec.readout is not None else ""
    lines = [
        f"# Conversion report: {model.ref} (conversion {conversion.number})",
        "",
        f"- created: {conversion.created_at}; registered: {model.created_at}",
        f"- source: `{model.source_ref}` ({model.source_kind}), sha256 `{model.source_sha256[:16]}...`",
        f"- eval data sha256 `{model.eval_sha256[:16]}...`; "
        f"calibration sha256 `{model.calibration_sha256[:16] or '-'}`",
        f"- task {spec.task}, metric {metric_title(spec)}{readout}",
        f"- budgets: {spec.budgets.describe(spec.metric_name)}",
        f"- options: {conversion.options}; bundle `{conversion.bundle_file}` sha256 `{conversion.bundle_sha256}`",
        "- latencies: median of all timed calls (range of the medians of 5 rounds); time ratios vs the fp32 "
        "parent of the same target on the same runtime at batch 1 / at the typical batch; figures of the first "
        "runtime a variant passed on (the others under *runtimes* and in the agreement table)",
        '- status *structural*: structurally valid, not executed on this host (never "passed")',
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows(conversion.results)]
    skipped = not_measured(conversion.results)
    if skipped:
        lines += ["", "## Refused before measurement", ""]
        lines += [f"- {r['variant_id']}: {'; '.join(r['reasons'])}" for r in skipped]
    lines += ["", "![size, metric and latency per variant, with their budgets](plot.png)", ""]
    lines += agreement_lines(agreement or {})
    return "\n".join(lines)


def _structural_lines(results: list[dict[str, Any]]) -> list[str]:
    return [f"{r['variant_id']}: structurally valid, not executed on this host" for r in results
            if r["status"] == "structural"]  # fmt: skip


def plot_figure(results: list[dict[str, Any]], spec: ModelSpec) -> Any:
    """Four panels (size, metric, latency at batch 1 and at the typical batch), each with its budget lines.

    Refused rungs are grey and hatched; latency bars carry the range of the round medians; the rungs
    refused before measurement are listed under the panels. The metric axis is zoomed to the values.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r["metrics"].get("size_bytes") is not None and r["status"] != "structural"]
    batch = next((r["metrics"].get("latency_batch") for r in measured if r["metrics"].get("latency_batch")), "N")
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.8))
    _size_panel(axes[0], measured, spec)
    _metric_panel(axes[1], measured, spec)
    _latency_panel(axes[2], measured, spec, "b1", "latency p50, batch 1 (ms)")
    _latency_panel(axes[3], measured, spec, "batch", f"latency p50, batch {batch} (ms)")
    lines = _not_measured_lines(not_measured(results)) + _structural_lines(results)
    if lines:
        figure.text(0.01, 0.01, "\n".join(lines), fontsize=8, color="dimgray", va="bottom")
    figure.tight_layout(rect=(0, 0.035 * len(lines), 1, 1))
    return figure


def _not_measured_lines(skipped: list[dict[str, Any]]) -> list[str]:
    """``refused before measurement: a, b: reason`` lines, variants with the same reason grouped, wrapped."""
    import textwrap

    by_reason: dict[str, list[str]] = {}
    for result in skipped:
        by_reason.setdefault("; ".join(result["reasons"]), []).append(result["variant_id"])
    lines: list[str] = []
    for reason, variants in by_reason.items():
        lines += textwrap.wrap(f"refused before measurement: {', '.join(variants)}: {reason}", width=190)
    return lines


def plot_png(results: list[dict[str, Any]], spec: ModelSpec) -> bytes:
    import matplotlib.pyplot as plt

    figure = plot_figure(results, spec)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _values(measured: list[dict[str, Any]], key: str, factor: float = 1.0) -> list[float]:
    return [float(r["metrics"].get(key) or 0.0) * factor for r in measured]


def _size_panel(axis: Any, measured: list[dict[str, Any]], spec: ModelSpec) -> None:
    _bar_panel(axis, measured, "size (KiB, lower is better)", _values(measured, "size_bytes", 1 / 1024))
    _parent_lines(axis, measured, "size_bytes", 1 / 1024, "fp32 parent (quantised must be smaller)")
    if spec.budgets.max_size_bytes is not None:
        axis.axhline(spec.budgets.max_size_bytes / 1024, color="tab:purple", linestyle=":", label="budget: max size")
    axis.legend(fontsize=7, loc="best")


def _metric_panel(axis: Any, measured: list[dict[str, Any]], spec: ModelSpec) -> None:
    values = _values(measured, "metric_value")
    _bar_panel(axis, measured, metric_title(spec), values)
    source = next((r["metrics"].get("source_metric_value") for r in measured), None)
    if source is not None:
        allowed = spec.budgets.allowed_drop(spec.metric_name, float(source))
        limit = source - allowed if spec.higher_is_better else source + allowed
        axis.axhline(source, color="tab:blue", linewidth=1, label=f"source {source:.4g}")
        axis.axhline(limit, color="tab:red", linestyle="--", label=f"budget: {limit:.4g}")
        values = [*values, float(source), float(limit)]
    _zoom(axis, values)
    axis.legend(fontsize=7, loc="best")


def _latency_panel(axis: Any, measured: list[dict[str, Any]], spec: ModelSpec, label: str, title: str) -> None:
    bars = _bar_panel(axis, measured, title + ", lower is better", _values(measured, f"latency_{label}_p50_ms"))
    low, high = [], []
    for bar, result in zip(bars, measured, strict=True):
        spread = result["metrics"].get(f"latency_{label}_p50_range_ms") or [bar.get_height()] * 2
        low.append(max(0.0, bar.get_height() - spread[0]))
        high.append(max(0.0, spread[1] - bar.get_height()))
    centres = [bar.get_x() + bar.get_width() / 2 for bar in bars]
    axis.errorbar(centres, [b.get_height() for b in bars], yerr=[low, high], fmt="none", ecolor="black", capsize=3)
    ratio = spec.budgets.max_latency_ratio
    _parent_lines(axis, measured, f"latency_{label}_p50_ms", ratio, f"budget: fp32 parent x {ratio:g}")
    if label == "b1" and spec.budgets.max_latency_ms is not None:
        axis.axhline(spec.budgets.max_latency_ms, color="tab:purple", linestyle=":", label="budget: p95 max latency")
    axis.legend(fontsize=7, loc="best")


def _parent_lines(axis: Any, measured: list[dict[str, Any]], key: str, factor: float, label: str) -> None:
    """A dashed segment per target over its bars, at its fp32 parent's value times ``factor``."""
    positions = {r["variant_id"]: i for i, r in enumerate(measured)}
    for target in dict.fromkeys(r["target"] for r in measured):
        parent = next((r for r in measured if r["target"] == target and r["precision"] == "fp32"), None)
        if parent is None or parent["metrics"].get(key) is None:
            continue
        spots = [positions[r["variant_id"]] for r in measured if r["target"] == target]
        level = float(parent["metrics"][key]) * factor
        axis.hlines(level, min(spots) - 0.45, max(spots) + 0.45, colors="tab:red", linestyles="--", label=label)
        label = "_nolegend_"


def _bar_panel(axis: Any, measured: list[dict[str, Any]], title: str, values: list[float]) -> Any:
    colors = ["tab:green" if r["status"] == "passed" else "lightgrey" for r in measured]
    bars = axis.bar([r["variant_id"] for r in measured], values, color=colors)
    for bar, result in zip(bars, measured, strict=True):
        bar.set_hatch("" if result["status"] == "passed" else "//")
    axis.set_title(title, fontsize=10)
    axis.tick_params(axis="x", rotation=60, labelsize=8)
    return bars


def _zoom(axis: Any, values: list[float]) -> None:
    if values:
        low, high = min(values), max(values)
        margin = max((high - low) * 0.5, abs(high) * 0.01, 1e-6)
        axis.set_ylim(low - margin, high + margin)


def html_page(model: ModelVersion, conversion: Conversion, png: bytes, agreement: dict[str, Any] | None = None,
              agreement_png: bytes | None = None) -> str:  # fmt: skip
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns(model.spec))
    body = "".join(
        f"<tr class='{html.escape(row[1])}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in rows(conversion.results)
    )
    summary = html.escape(markdown(model, conversion).split("\n\n")[0]).replace("\n", "<br>")
    skipped = "".join(
        f"<li>{html.escape(r['variant_id'])}: {html.escape('; '.join(r['reasons']))}</li>"
        for r in not_measured(conversion.results)
    )
    skipped_html = f"<h2>Refused before measurement</h2><ul>{skipped}</ul>" if skipped else ""
    image = base64.b64encode(png).decode("ascii")
    agreement_html = _agreement_html(agreement or {}, agreement_png)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(model.ref)} conversion {conversion.number}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:4px 6px}tr.passed{background:#eefbe9}tr.refused{background:#fdeaea}"
        "tr.structural{background:#fdf8e2}"
        f"</style></head><body><p>{summary}</p><table><tr>{head}</tr>{body}</table>{skipped_html}"
        f"<p><img alt='size, metric and latency per variant, with their budgets' "
        f"src='data:image/png;base64,{image}'></p>{agreement_html}</body></html>"
    )


def _agreement_html(agreement: dict[str, Any], png: bytes | None) -> str:
    lines = agreement_lines(agreement)
    if not lines:
        return ""
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| variant")]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[4].strip("|").split("|"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row.strip("|").split("|"))
                   + "</tr>" for row in table)  # fmt: skip
    image = (
        ""
        if png is None
        else (
            "<p><img alt='agreement between every pair of executed variants' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'></p>"
        )
    )
    return f"<h2>Cross-target agreement</h2><p>{html.escape(lines[2])}</p><table><tr>{head}</tr>{body}</table>{image}"


def _agreement(home: Home, model: ModelVersion, conversion: Conversion) -> dict[str, Any]:
    """The cross-target agreement the conversion saved in its ``results.json`` (empty for older conversions)."""
    path = home.conversion_dir(model.name, model.version, conversion.number) / "results.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    found = saved.get("agreement") if isinstance(saved, dict) else None
    return found if isinstance(found, dict) else {}


def write_report(home: Home, model: ModelVersion, conversion: Conversion) -> Path:
    """Write the three report files (atomically as a directory) and return the HTML path."""
    final = home.reports_dir(model.name, model.version) / f"conversion-{conversion.number}"
    if final.exists():
        return final / "report.html"
    agreement = _agreement(home, model, conversion)
    with staging_dir(final) as staging:
        png = plot_png(conversion.results, model.spec)
        (staging / "plot.png").write_bytes(png)
        agreement_png = agreement_plot(agreement)
        if agreement_png is not None:
            (staging / "agreement.png").write_bytes(agreement_png)
        (staging / "report.md").write_text(markdown(model, conversion, agreement))
        (staging / "report.html").write_text(html_page(model, conversion, png, agreement, agreement_png))
        publish_dir(staging, final)
    return final / "report.html"

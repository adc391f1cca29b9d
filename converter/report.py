"""Conversion reports: a Markdown and an HTML page with a size / accuracy / latency plot, and the rich table.

The report is written after the conversion is recorded, to ``reports/<name>/<version>/conversion-<n>/``
(``report.md``, ``report.html`` with the plot embedded, ``plot.png``). It lists every rung, the
refused ones with the reasons and numbers that refused them. Reports are for people: unlike the
bundle they carry timings and memory figures, so two runs' reports differ.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from rich.table import Table

from converter.home import Home, publish_dir, staging_dir
from converter.registry import Conversion, ModelVersion

_COLUMNS = ("variant", "status", "size", "x fp32 size", "metric", "drop", "max err", "top-1", "p50 b1 ms",
            "p50 batch ms", "x fp32 time", "why refused")  # fmt: skip


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


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row of strings per rung, in :data:`_COLUMNS` order."""
    out = []
    for r in results:
        m = r["metrics"]
        name = r["variant_id"] + (" *" if m.get("preferred") else "")
        out.append([
            name, r["status"], _size(m.get("size_bytes")), _fmt(m.get("size_ratio_to_fp32"), 3),
            _fmt(m.get("metric_value")), _fmt(m.get("metric_drop")), _fmt(m.get("max_abs_error"), 3),
            _fmt(m.get("top1_agreement")), _fmt(m.get("latency_b1_p50_ms"), 3), _fmt(m.get("latency_batch_p50_ms"), 3),
            _fmt(m.get("latency_ratio_to_fp32"), 3), "; ".join(r["reasons"]),
        ])  # fmt: skip
    return out


def rich_table(model: ModelVersion, results: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{model.ref}: variants ({model.spec.metric}; * = the ladder's choice)")
    for column in _COLUMNS:
        table.add_column(column, overflow="fold", max_width=60 if column == "why refused" else None)
    for row in rows(results):
        style = "green" if row[1] == "passed" else "red"
        table.add_row(*row, style=style)
    return table


def markdown(model: ModelVersion, conversion: Conversion) -> str:
    spec = model.spec
    lines = [
        f"# Conversion report: {model.ref} (conversion {conversion.number})",
        "",
        f"- created: {conversion.created_at}; registered: {model.created_at}",
        f"- source: `{model.source_ref}` ({model.source_kind}), sha256 `{model.source_sha256[:16]}...`",
        f"- eval data sha256 `{model.eval_sha256[:16]}...`; "
        f"calibration sha256 `{model.calibration_sha256[:16] or '-'}`",
        f"- task {spec.task}, metric {spec.metric}; budgets: {spec.budgets.describe(spec.metric_name)}",
        f"- options: {conversion.options}; bundle `{conversion.bundle_file}` sha256 `{conversion.bundle_sha256}`",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows(conversion.results)]
    lines += ["", "![size, metric and latency per variant](plot.png)", ""]
    return "\n".join(lines)


def plot_png(results: list[dict[str, Any]], metric: str) -> bytes:
    """Four panels (size, metric, latency at batch 1 and at the batch size); refused rungs grey and hatched.

    The metric axis is zoomed to the values (variants often differ in the third decimal).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r["metrics"].get("size_bytes") is not None]
    batch = next((r["metrics"].get("latency_batch") for r in measured if r["metrics"].get("latency_batch")), "N")
    panels = (("size (KiB)", "size_bytes", 1 / 1024), (metric, "metric_value", 1.0),
              ("latency p50, batch 1 (ms)", "latency_b1_p50_ms", 1.0),
              (f"latency p50, batch {batch} (ms)", "latency_batch_p50_ms", 1.0))  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(17, 4.4))
    for axis, (title, key, factor) in zip(axes, panels, strict=True):
        _bar_panel(axis, measured, title, [float(r["metrics"].get(key) or 0.0) * factor for r in measured])
    _zoom(axes[1], [float(r["metrics"].get("metric_value") or 0.0) for r in measured])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _bar_panel(axis: Any, measured: list[dict[str, Any]], title: str, values: list[float]) -> None:
    colors = ["tab:green" if r["status"] == "passed" else "lightgrey" for r in measured]
    bars = axis.bar([r["variant_id"] for r in measured], values, color=colors)
    for bar, result in zip(bars, measured, strict=True):
        bar.set_hatch("" if result["status"] == "passed" else "//")
    axis.set_title(title)
    axis.tick_params(axis="x", rotation=60, labelsize=8)


def _zoom(axis: Any, values: list[float]) -> None:
    if values:
        low, high = min(values), max(values)
        margin = max((high - low) * 0.5, abs(high) * 0.01, 1e-6)
        axis.set_ylim(low - margin, high + margin)


def html_page(model: ModelVersion, conversion: Conversion, png: bytes) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS)
    body = "".join(
        f"<tr class='{html.escape(row[1])}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in rows(conversion.results)
    )
    summary = html.escape(markdown(model, conversion).split("\n\n")[0]).replace("\n", "<br>")
    image = base64.b64encode(png).decode("ascii")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(model.ref)} conversion {conversion.number}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:4px 6px}tr.passed{background:#eefbe9}tr.refused{background:#fdeaea}"
        f"</style></head><body><p>{summary}</p><table><tr>{head}</tr>{body}</table>"
        f"<p><img alt='size, metric and latency per variant' src='data:image/png;base64,{image}'></p></body></html>"
    )


def write_report(home: Home, model: ModelVersion, conversion: Conversion) -> Path:
    """Write the three report files (atomically as a directory) and return the HTML path."""
    final = home.reports_dir(model.name, model.version) / f"conversion-{conversion.number}"
    if final.exists():
        return final / "report.html"
    with staging_dir(final) as staging:
        png = plot_png(conversion.results, model.spec.metric_name)
        (staging / "plot.png").write_bytes(png)
        (staging / "report.md").write_text(markdown(model, conversion))
        (staging / "report.html").write_text(html_page(model, conversion, png))
        publish_dir(staging, final)
    return final / "report.html"

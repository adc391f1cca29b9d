"""Cross-target agreement: every executed variant against the source and against each other.

Each variant runs on the evaluation data in every runtime its target is gated on (LiteRT and
tflite-runtime for TFLite, ONNX Runtime for ONNX and ORT); all of those runs, refused ones too,
are compared here on the metric's output (the readout's): top-1 agreement (the share of equal class
decisions, read as the metric reads them; none for regression and embeddings), the largest and
the mean absolute difference, and each run's metric value. The report shows the table against the
source and a heat map of every pair (:func:`plot_png`), so a device fleet running ONNX on some
boards and TFLite on others can see how far apart their answers may be. Variants that could not
be executed on this host (Core ML off macOS) are not in it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from converter.gates import Reference, task_metric
from converter.metrics import agreement
from converter.spec import ModelSpec


@dataclass
class Executed:
    """One variant run on one runtime over the evaluation data."""

    variant_id: str
    runtime: str
    version: str
    outputs: dict[str, np.ndarray]
    status: str  # passed | refused (on this runtime)

    @property
    def label(self) -> str:
        return f"{self.variant_id}@{self.runtime}"


def agreement_report(reference: Reference, executed: list[Executed], spec: ModelSpec) -> dict[str, Any]:
    """Against the source (one row per run) and between every pair (matrices, the source first)."""
    primary = reference.primary
    rows = len(reference.outputs[primary])
    values = [reference.outputs[primary]] + [e.outputs[primary][:rows] for e in executed]
    reading = reference.readout.reading
    labels = ["source"] + [e.label for e in executed]
    top1 = [[agreement(a, b, reading) for b in values] for a in values]
    max_diff = [[_diff(a, b, np.max) for b in values] for a in values]
    mean_diff = [[_diff(a, b, np.mean) for b in values] for a in values]
    vs_source = []
    for index, run in enumerate(executed, start=1):
        vs_source.append({
            "label": run.label, "variant": run.variant_id, "runtime": run.runtime, "version": run.version,
            "status": run.status, "top1_agreement": top1[index][0], "max_abs_diff": max_diff[index][0],
            "mean_abs_diff": mean_diff[index][0],
            "metric_value": task_metric(spec, reference.readout, values[index], reference.targets, values[0]),
        })  # fmt: skip
    return {"output": primary, "metric": spec.metric_name, "source_metric_value": reference.metric_value,
            "labels": labels, "statuses": ["source"] + [e.status for e in executed], "vs_source": vs_source,
            "top1_agreement": top1, "max_abs_diff": max_diff, "mean_abs_diff": mean_diff}  # fmt: skip


def _diff(a: np.ndarray, b: np.ndarray, reduce: Any) -> float | None:
    if a.dtype.kind != "f" or b.dtype.kind != "f" or a.shape != b.shape:
        return None
    return float(reduce(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def markdown_lines(report: dict[str, Any]) -> list[str]:
    """The table against the source, for the report."""
    if not report or not report.get("vs_source"):
        return []
    metric = report["metric"]
    lines = [
        "## Cross-target agreement",
        "",
        f"Every executed variant on every runtime against the source on the evaluation data (output "
        f"`{report['output']}`; the source's {metric}: {_fmt(report['source_metric_value'])}). "
        "Pairs between variants are in the plot.",
        "",
        f"| variant @ runtime | status there | top-1 agreement | max abs diff | mean abs diff | {metric} |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["vs_source"]:
        lines.append(
            f"| {row['label']} {row['version']} | {row['status']} | {_fmt(row['top1_agreement'])} | "
            f"{_fmt(row['max_abs_diff'])} | {_fmt(row['mean_abs_diff'])} | {_fmt(row['metric_value'])} |"
        )
    return [*lines, "", "![agreement between every pair of executed variants](agreement.png)", ""]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_png(report: dict[str, Any]) -> bytes | None:
    """Heat maps of every pair: top-1 agreement (classifiers) and the mean absolute difference (log scale)."""
    if not report or len(report.get("labels", [])) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean_abs_diff", "mean abs difference (log scale, lower is closer)")]
    if report["top1_agreement"][0][0] is not None:
        panels.insert(0, ("top1_agreement", "top-1 agreement"))
    labels = [label + (" (refused)" if status == "refused" else "")
              for label, status in zip(report["labels"], report["statuses"], strict=True)]  # fmt: skip
    size = max(5.0, 0.45 * len(labels) + 3.0)
    figure, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) + 1.5, size))
    for axis, (key, title) in zip(np.atleast_1d(axes), panels, strict=True):
        _heat_map(figure, axis, report[key], labels, title, log=key != "top1_agreement")
    figure.suptitle(f"agreement between executed variants (output {report['output']})", fontsize=11)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _heat_map(figure: Any, axis: Any, values: list[list[float | None]], labels: list[str], title: str,
              log: bool) -> None:  # fmt: skip
    from matplotlib.colors import LogNorm, Normalize

    matrix = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    finite = matrix[np.isfinite(matrix) & (matrix > 0)] if log else matrix[np.isfinite(matrix)]
    if finite.size == 0:
        return
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if log else Normalize(vmin=finite.min(), vmax=1.0)
    shown = np.where(matrix > 0, matrix, np.nan) if log else matrix
    image = axis.imshow(shown, cmap="magma_r" if log else "viridis", norm=norm)
    axis.set_xticks(range(len(labels)), labels, rotation=70, ha="right", fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    if len(labels) <= 24:
        middle = norm(np.nanmedian(shown)) if np.isfinite(shown).any() else 0.5
        for i in range(len(labels)):
            for j in range(len(labels)):
                if np.isfinite(shown[i, j]):
                    dark = norm(shown[i, j]) > 0.5 if log else norm(shown[i, j]) < max(middle, 0.5)
                    axis.text(j, i, f"{matrix[i, j]:.2g}", ha="center", va="center", fontsize=5,
                              color="white" if dark else "black")  # fmt: skip
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axis, fraction=0.046)

"""Converter benchmark: every precision of the digits CNN against its fp32 parent, on this CPU.

Trains the small digits CNN (a few seconds), registers and converts it with the real
``edgefleet-convert`` pipeline (onnx and ort targets, every precision incl. ConvInteger dynamic
int8), then times each variant against the fp32 variant of the same target in interleaved rounds
at batch 1 and batch 32 (best round median of each, so load from other processes hits both alike).

Targets (issue 3): static int8 at most 30 % of the fp32 size, at most 1 accuracy point lost, and
not slower than fp32 at batch 32 (latency ratio <= 1.00).

Writes its table to ``docs/benchmarks.md`` between ``<!-- BEGIN converter -->`` and ``<!-- END converter -->``.
Command: ``.venv/bin/python benchmarks/converter.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mdreport import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converter.exporters.onnx import SessionRunner  # noqa: E402
from converter.gates import feeds_at  # noqa: E402
from converter.home import Home  # noqa: E402
from converter.registry import Registry  # noqa: E402

SECTION = "converter"
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-dynamic-all", "int8-static")


def convert(home: Path, work: Path) -> tuple[Registry, Any]:
    from tests.converter.conftest import train_digits_cnn
    from tests.converter.helpers import ok, register_cnn

    os.environ["EDGEFLEET_HOME"] = str(home)
    cnn = train_digits_cnn(work / "cnn", epochs=12)
    # a generous speed allowance so every variant is built and kept for timing; the verdicts below are ours
    register_cnn("digits", cnn, "--max-latency-ratio", "100", "--max-drop", "1")
    ok("convert", "digits", "--targets", "onnx,ort", "--quantize", ",".join(PRECISIONS))
    registry = Registry(Home(home))
    model = registry.get("digits")
    return registry, model


def time_ratio(parent: SessionRunner, child: SessionRunner, feeds: dict[str, np.ndarray], rounds: int,
               calls: int) -> tuple[float, float, float]:  # fmt: skip
    """(child ms, parent ms, ratio) from the best round median of interleaved rounds."""
    best = {"parent": float("inf"), "child": float("inf")}
    for _ in range(rounds):
        for key, runner in (("parent", parent), ("child", child)):
            for _ in range(3):
                runner.run(feeds)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                runner.run(feeds)
                times.append(time.perf_counter() - start)
            best[key] = min(best[key], float(np.median(times)))
    return best["child"] * 1e3, best["parent"] * 1e3, best["child"] / best["parent"]


def measure(registry: Registry, model: Any, rounds: int) -> list[dict[str, Any]]:
    conversion = registry.latest_conversion(model)
    bundle_dir = registry.home.conversion_dir("digits", model.version, conversion.number) / "bundle"
    data = np.load(registry.home.artifacts_dir("digits", model.version) / model.eval_file)
    from converter.datasets import Dataset

    dataset = Dataset(inputs={"x": data["x"]}, labels=data["y"])
    rows = []
    for result in conversion.results:
        if result["status"] != "passed":
            rows.append({**result, "b1": None, "b32": None})
            continue
        target = result["target"]
        entry = "model.onnx" if target == "onnx" else "model.ort"
        child = SessionRunner(bundle_dir / "variants" / result["variant_id"] / entry, result["variant_id"])
        parent = SessionRunner(bundle_dir / "variants" / f"{target}-fp32" / entry, f"{target}-fp32")
        b1 = time_ratio(parent, child, feeds_at(dataset, 1), rounds, 200)
        b32 = time_ratio(parent, child, feeds_at(dataset, 32), rounds, 40)
        rows.append({**result, "b1": b1, "b32": b32})
    return rows


def table(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    lines = [
        "| variant | size (B) | size / fp32 | accuracy | drop (points) | b1 ms (fp32 ms) | b1 / fp32 "
        "| b32 ms (fp32 ms) | b32 / fp32 | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts: list[str] = []
    for row in rows:
        m = row["metrics"]
        b1, b32 = row["b1"], row["b32"]
        timing = (f"{b1[0]:.4f} ({b1[1]:.4f}) | {b1[2]:.2f} | {b32[0]:.3f} ({b32[1]:.3f}) | {b32[2]:.2f}"
                  if b1 else "- | - | - | -")  # fmt: skip
        status = row["status"] + ("" if not row["reasons"] else f": {'; '.join(row['reasons'])}")
        lines.append(
            f"| {row['variant_id']} | {m.get('size_bytes', '-')} | {m.get('size_ratio_to_fp32', 0):.3f} "
            f"| {m.get('metric_value', 0):.4f} | {100 * (m.get('metric_drop') or 0):.2f} | {timing} | {status} |"
        )
        if row["variant_id"] == "onnx-int8-static" and b32:
            verdicts = targets(m, b32[2])
    return "\n".join(lines), verdicts


def targets(metrics: dict[str, Any], b32_ratio: float) -> list[str]:
    size = metrics["size_ratio_to_fp32"]
    checks = [
        ("size at most 30 % of fp32", size <= 0.30, f"{100 * size:.1f} %"),
        ("accuracy drop at most 1 point", metrics["metric_drop"] <= 0.01, f"{100 * metrics['metric_drop']:.2f} points"),
        ("not slower than fp32 at batch 32", b32_ratio <= 1.0, f"ratio {b32_ratio:.3f}"),
    ]  # fmt: skip
    return [f"- static int8 (onnx), {name}: {value} -> {'met' if ok else '**not met**'}" for name, ok, value in checks]


def host() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, load average {load:.1f} at the start; ONNX Runtime, 1 intra-op thread"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    machine = host()
    with tempfile.TemporaryDirectory(prefix="bench-converter-") as temp:
        registry, model = convert(Path(temp) / "home", Path(temp))
        rows = measure(registry, model, args.rounds)
    body, verdicts = table(rows)
    text = "\n".join([
        "Small CNN (38 k parameters) trained 12 epochs on scikit-learn digits, 450 evaluation images; every",
        "variant built by `edgefleet-convert convert` and timed against the fp32 variant of the same target",
        "(interleaved rounds, best round median). ORT-format files are compared with ORT-format fp32.",
        f"Host: {machine}.", "", body, "", "Targets:", *verdicts, "",
        "Command: `.venv/bin/python benchmarks/converter.py`",
    ])  # fmt: skip
    print(text)
    if not args.no_write:
        write_section(SECTION, "Converter: precisions of the digits CNN", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: what the device agent adds on top of the runtime, per prediction, at import and at idle.

Compared in the same run on the same ONNX model and the same batch-1 input, for two models: the
tiny classifier (4 features, 3 classes) and a digits-sized one (64 features, 10 classes):

- baseline: ``onnxruntime.InferenceSession.run`` called directly (same thread count as the bundle);
- ``Agent.predict``: the full path an app uses (serving pipeline with the bundle's deadline, telemetry
  recorder on with windows, histograms and sampling; local engine admission; the Predictor's input
  check and post-processing: softmax, argmax, label map), with and without a bundle deadline, and
  with the deadline forced onto the worker-thread path (inline runs off) for comparison.

Calls are interleaved in blocks so both see the same machine state; the figure is the difference of
medians. Target: median overhead <= max(5 % of the runtime call, 30 us). Also measured: the import
time of ``device_agent.agent`` in a fresh interpreter, and the idle RSS of an agent with no model
loaded, with the share of the ONNX Runtime import taken out.

What telemetry itself adds (issue 6: predict with histograms and 1 % sampling on versus off) is
``benchmarks/telemetry_overhead.py``, on the same models and the same serving path.

Run: ``.venv/bin/python benchmarks/agent_overhead.py`` (writes its section of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
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
SECTION = "agent_overhead"


def install_tiny_bundle(state_dir: Path, deadline: bool = True, n_features: int = 4, n_classes: int = 3) -> Path:
    """Build the tiny classifier bundle and commit it into slot a, as an update would.

    Without ``deadline`` the manifest's ``runtime_config.deadline_ms`` is removed, so the serving
    pipeline calls the engine on the caller's thread instead of racing it against the deadline.
    """
    import dataclasses

    from bundles.archive import ArchiveLimits, pack_variant
    from bundles.testing import build_bundle_dir
    from device_agent.slots import ModelSlots

    src = state_dir.parent / f"bundle-src-{deadline}-{n_features}"
    manifest = build_bundle_dir(src, name="tiny", version=1, n_features=n_features, n_classes=n_classes)
    if not deadline:
        manifest = dataclasses.replace(
            manifest, runtime_config=dataclasses.replace(manifest.runtime_config, deadline_ms=None)
        )
    archive = pack_variant(src, manifest, "onnx-fp32", state_dir.parent / f"tiny-{deadline}-{n_features}.tar.gz")
    slots = ModelSlots(state_dir / "models", "tiny")
    slots.stage("a", archive, manifest.to_bytes(), "onnx-fp32", ArchiveLimits())
    slots.activate("a")
    slots.commit("a")
    return slots.slot_dir("a") / manifest.variant("onnx-fp32").entry


def time_calls(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - start) / 1000.0)
    return out


MODELS = {"tiny": (4, 3), "digits": (64, 10)}
"""Benchmark models: name -> (features, classes)."""


def measure_overhead(rounds: int, block: int, n_features: int, n_classes: int) -> dict[str, float]:
    import onnxruntime as ort

    from device_agent.agent import Agent
    from device_agent.serving import ServingConfig, ServingPipeline

    with tempfile.TemporaryDirectory() as tmp:
        model_path = install_tiny_bundle(Path(tmp) / "device", True, n_features, n_classes)
        install_tiny_bundle(Path(tmp) / "device-nodeadline", False, n_features, n_classes)
        agent = Agent.from_config(environ={}, state_dir=Path(tmp) / "device")
        plain = Agent.from_config(environ={}, state_dir=Path(tmp) / "device-nodeadline")
        threaded = Agent.from_config(environ={}, state_dir=Path(tmp) / "device")  # same bundle, inline runs off
        threaded.pipeline.close()
        threaded.pipeline = ServingPipeline(
            threaded.engine, ServingConfig(inline_deadline_margin=0.0), recorder=threaded.recorder
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).normal(size=(1, n_features)).astype(np.float32)
        predictor = agent.engine._active["tiny"].predictor  # noqa: SLF001 - to split the overhead
        calls = {
            "raw": lambda: session.run(None, {"x": x}),
            "predictor": lambda: predictor.predict({"x": x}),
            "engine": lambda: plain.engine.predict("tiny", {"x": x}),
            "agent_nodeadline": lambda: plain.predict({"x": x}),
            "agent": lambda: agent.predict({"x": x}),
            "agent_thread": lambda: threaded.predict({"x": x}),
        }
        for a in (agent, plain, threaded):
            assert a.predict({"x": x}).source == "local"
        for _ in range(200):
            for call in calls.values():
                call()
        guard = agent.pipeline.deadline_guard("tiny")
        assert guard is not None and guard.inline, "after warm-up the tiny model must run inline"
        timings: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                timings[name] += time_calls(call, block)
        pairs = rounds * block
        paired = {name: paired_overhead_us(calls["raw"], call, pairs) for name, call in calls.items() if name != "raw"}
        for a in (agent, plain, threaded):
            a.close()
    out = {f"{name}_median_us": statistics.median(t) for name, t in timings.items()}
    out.update({f"{name}_paired_us": value for name, value in paired.items()})
    out.update({f"{name}_p90_us": statistics.quantiles(t, n=10)[-1] for name, t in timings.items()})
    out["calls"] = float(len(timings["agent"]))
    return out


def paired_overhead_us(raw: Any, path: Any, n: int) -> float:
    """Median over back-to-back pairs (order alternating) of path - raw: cancels slow load swings."""
    clock = time.perf_counter_ns
    diffs = []
    for i in range(n):
        first, second = (raw, path) if i % 2 == 0 else (path, raw)
        start = clock()
        first()
        middle = clock()
        second()
        end = clock()
        a, b = (middle - start, end - middle) if i % 2 == 0 else (end - middle, middle - start)
        diffs.append((b - a) / 1000.0)
    return statistics.median(diffs)


def fresh_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return done.stdout.strip().splitlines()[-1]


RSS = (
    "import os\n"
    "def rss():\n"
    "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
)


def measure_import_and_rss(repeats: int) -> dict[str, float]:
    import_s = [float(fresh_python("import time; t = time.perf_counter(); import device_agent.agent; "
                                   "print(time.perf_counter() - t)")) for _ in range(repeats)]  # fmt: skip
    ort_import_s = [float(fresh_python("import time, numpy; t = time.perf_counter(); import onnxruntime; "
                                       "print(time.perf_counter() - t)")) for _ in range(repeats)]  # fmt: skip
    idle = RSS + (
        "import sys, tempfile, pathlib\n"
        "from device_agent.agent import Agent\n"
        "d = pathlib.Path(tempfile.mkdtemp())\n"
        "a = Agent.from_config(environ={}, state_dir=d)\n"
        "print(rss(), 'onnxruntime' in sys.modules)\n"
    )
    idle_mb, ort_loaded = fresh_python(idle).split()
    ort_delta = RSS + "import numpy, httpx\nbefore = rss()\nimport onnxruntime\nprint(rss() - before)\n"
    bare = RSS + "print(rss())\n"
    return {
        "import_ms": statistics.median(import_s) * 1000, "ort_import_ms": statistics.median(ort_import_s) * 1000,
        "idle_rss_mb": float(idle_mb), "ort_import_rss_mb": float(fresh_python(ort_delta)),
        "python_rss_mb": float(fresh_python(bare)), "ort_loaded_at_idle": float(ort_loaded == "True"),
    }  # fmt: skip


def target_us(o: dict[str, float]) -> float:
    return max(0.05 * o["raw_median_us"], 30.0)


def met(o: dict[str, float], name: str) -> bool:
    return o[f"{name}_median_us"] - o["raw_median_us"] <= target_us(o)


def _row(o: dict[str, float], name: str, label: str, judged: bool = True) -> str:
    median, p90, raw = o[f"{name}_median_us"], o[f"{name}_p90_us"], o["raw_median_us"]
    if name == "raw":
        return f"| {label} | {median:.1f} us | {p90:.1f} us | baseline | baseline | |"
    verdict = ("met" if met(o, name) else "**not met**") + f" (<= {target_us(o):.0f} us)" if judged else "-"
    paired = o[f"{name}_paired_us"]
    return f"| {label} | {median:.1f} us | {p90:.1f} us | {median - raw:+.1f} us | {paired:+.1f} us | {verdict} |"


def model_table(name: str, o: dict[str, float]) -> list[str]:
    features, classes = MODELS[name]
    return [
        f"**{name}** ({features} features, {classes} classes), batch 1, {int(o['calls'])} calls each, interleaved.",
        "",
        "| path | median | p90 | median overhead | paired overhead | target |",
        "|---|---|---|---|---|---|",
        _row(o, "raw", "raw `onnxruntime` `session.run`"),
        _row(o, "predictor", "`Predictor.predict` (input check + softmax/argmax/label post-processing)", False),
        _row(o, "engine", "`LocalEngine.predict` (admission, in-flight count, then the Predictor)", False),
        _row(o, "agent_nodeadline", "`Agent.predict`, telemetry on, bundle without `deadline_ms`"),
        _row(o, "agent", "`Agent.predict`, telemetry on, bundle `deadline_ms` = 50 (inline fast path)"),
        _row(o, "agent_thread", "`Agent.predict`, telemetry on, `deadline_ms` = 50 on the worker thread", False),
        "",
    ]


def table(results: dict[str, dict[str, float]], m: dict[str, float]) -> str:
    excl = m["idle_rss_mb"] - (m["ort_import_rss_mb"] if m["ort_loaded_at_idle"] else 0.0)
    lines: list[str] = []
    for name, o in results.items():
        lines += model_table(name, o)
    return "\n".join(lines + [
        "Target (issue 5): `Agent.predict` median overhead <= max(5 % of the raw call, 30 us), judged on the",
        "no-deadline and deadline rows with the difference of block medians (blocks of calls to one path,",
        "rounds interleaved: the stricter figure). Paired overhead = median over back-to-back pairs (raw and",
        "path alternating call by call) of path - raw, which cancels the load swings of a shared machine;",
        "it is shown for information. With a deadline, a model whose recent p99 latency is far below it (x10)",
        "runs inline; the worker-thread row shows what the hand-off costs when the model is close to its",
        "deadline or has missed it recently (docs/agent.md, \"Deadlines\").",
        "",
        "| measure | value |",
        "|---|---|",
        f"| import `device_agent.agent` (fresh interpreter, median) | {m['import_ms']:.0f} ms |",
        f"| import `onnxruntime` alone (after numpy) | {m['ort_import_ms']:.0f} ms |",
        f"| idle RSS of an agent, no model (bare Python: {m['python_rss_mb']:.1f} MiB) | {m['idle_rss_mb']:.1f} MiB |",
        f"| idle RSS excluding the ONNX Runtime import ({m['ort_import_rss_mb']:.1f} MiB) | {excl:.1f} MiB |",
        "",
        "Command: `.venv/bin/python benchmarks/agent_overhead.py`",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=250)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results = {name: measure_overhead(args.rounds, args.block, *shape) for name, shape in MODELS.items()}
    memory = measure_import_and_rss(5)
    body = table(results, memory)
    print(body)
    for name, o in results.items():
        verdicts = [met(o, path) for path in ("agent_nodeadline", "agent")]
        print(f"target (issue 5) on {name}: {'MET' if all(verdicts) else 'NOT MET'}")
    if not args.no_write:
        write_section(SECTION, "Device agent overhead", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The child side of a runtime worker: a runtime of another Python environment, driven over pipes.

The old ``tflite-runtime`` 2.14 needs numpy < 2 and cannot live beside the converter's numpy 2, so
the converter validates TFLite variants on it in a separate, small environment
(``scripts/setup.sh`` builds ``.venv-tflite214``) by starting ``python -m converter.runtime_worker``
there with this repository on ``PYTHONPATH``. The worker loads models with the devices' own code
(:func:`bundles.runtimes.base.load_runtime`), so what is validated is what a device runs. It
imports only the standard library, numpy and ``bundles.runtimes``.

Protocol: one JSON request per line on stdin, one JSON reply per line on the original stdout;
arrays travel as ``.npy`` files in a directory the parent names. The process's stdout is pointed
at stderr at start, so a runtime printing from C++ ("Created TensorFlow Lite XNNPACK delegate")
cannot corrupt the replies. Requests (``op``): ``hello``, ``load`` (handle, target, runtime, path,
threads), ``run`` (handle, feeds: name -> .npy, out_dir), ``time`` (handle, feeds, calls, warmup,
budget_s: seconds of each call), ``memory`` (handle: peak RSS growth since before its load),
``close`` (handle). Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from bundles.errors import EdgeFleetError


def _status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak RSS since the last :func:`reset_peak_rss` (the current RSS if the kernel has no mark)."""
    return _status_bytes("VmHWM") or _status_bytes("VmRSS")


class Worker:
    """The loaded models of one worker process, by handle."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] = {}
        self.rss_before: dict[str, int] = {}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ValueError(f"unknown op {op!r}")
        reply: dict[str, Any] = handler(request)
        return reply

    def op_hello(self, request: dict[str, Any]) -> dict[str, Any]:
        from importlib import metadata

        versions = {}
        for dist in request.get("distributions", []):
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[dist] = ""
        return {"python": platform.python_version(), "numpy": np.__version__, "versions": versions}

    def op_load(self, request: dict[str, Any]) -> dict[str, Any]:
        from bundles.runtimes.base import load_runtime

        handle = request["handle"]
        self.rss_before[handle] = reset_peak_rss()
        runtime = load_runtime(request["target"], Path(request["path"]), int(request.get("threads", 1)),
                               runtime=request["runtime"])  # fmt: skip
        self.loaded[handle] = runtime
        return {"inputs": list(runtime.input_names), "outputs": list(runtime.output_names)}

    def op_run(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self.loaded[request["handle"]]
        outputs = runtime.run(_read_feeds(request["feeds"]))
        out_dir = Path(request["out_dir"])
        paths = {}
        for index, (name, value) in enumerate(outputs.items()):
            path = out_dir / f"out-{index}.npy"
            np.save(path, np.ascontiguousarray(value), allow_pickle=False)
            paths[name] = str(path)
        return {"outputs": paths}

    def op_time(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self.loaded[request["handle"]]
        feeds = _read_feeds(request["feeds"])
        for _ in range(int(request.get("warmup", 0))):
            runtime.run(feeds)
        calls, budget_s = int(request["calls"]), float(request["budget_s"])
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < calls and (len(times) < 10 or time.perf_counter() < deadline):
            start = time.perf_counter()
            runtime.run(feeds)
            times.append(time.perf_counter() - start)
        return {"times": times}

    def op_memory(self, request: dict[str, Any]) -> dict[str, Any]:
        peak = peak_rss_bytes()
        return {"peak_rss_delta_bytes": max(0, peak - self.rss_before.get(request["handle"], peak))}

    def op_close(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self.loaded.pop(request["handle"], None)
        if runtime is not None:
            runtime.close()
        return {}


def _read_feeds(feeds: dict[str, str]) -> dict[str, np.ndarray]:
    return {name: np.load(path, allow_pickle=False) for name, path in feeds.items()}


def serve(requests: TextIO, replies: TextIO) -> None:
    """Answer requests until stdin closes."""
    worker = Worker()
    for line in requests:
        if not line.strip():
            continue
        try:
            reply = {"ok": True, **worker.handle(json.loads(line))}
        except EdgeFleetError as e:  # the runtime's own refusal, already worded for people
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # every failure is an answer: the parent decides what it means
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything else written to stdout (C++ runtimes) goes to the log
    sys.stdout = sys.stderr
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()

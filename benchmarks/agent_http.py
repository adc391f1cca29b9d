"""Benchmark: the agent's localhost OIP API under load, against the same HTTP stack answering a fixed response.

The server side runs in this process: the real ``AgentHttpServer`` (waitress, the settings the daemon
derives from its config) in front of a real ``Agent`` (telemetry on, as in the daemon) serving a
digits-sized ONNX classifier (64 features, 10 classes); once the servers are up, the start-up objects
are frozen out of the garbage collector's full collections (``gc.freeze``), as the daemon does once
started. The baseline is the same server class with a WSGI app that returns a fixed JSON answer
without reading the request: what the HTTP stack alone costs. The load comes from another process
(``_loadgen.py``): asyncio on raw keep-alive sockets, so the generator stays cheaper per request than
the server it measures.

Rows: batch-1 JSON tensors, batch-1 binary tensors (``Inference-Header-Content-Length``) and the
fixed answer, each at concurrency 1, 8 and 64 (closed loop: every client sends its next request
when its answer arrives). Targets (issue 13): at concurrency 64 the inference rows reach at least
0.5x the fixed answer's throughput, and every row's p99 is at most 5x its p50.

Run: ``.venv/bin/python benchmarks/agent_http.py`` (writes its section of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loadgen  # noqa: E402
from _mdreport import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "agent_http"
CONCURRENCY = (1, 8, 64)
FIXED_ARM = "fixed answer (HTTP stack alone)"
WARM_S = 0.5
WORKERS_ARM = "JSON batch-1, worker threads only (reference)"
FIXED = json.dumps({"model_name": "tiny", "model_version": "1", "outputs": [
    {"name": "label", "shape": [1], "datatype": "BYTES", "data": ["7"]}]}).encode()  # fmt: skip


# --- the load generator (its own process) --------------------------------------------------------


def run_load(url: str, request: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    host, port = url.removeprefix("http://").split(":")
    return _loadgen.run_load(host, int(port), request, concurrency, seconds, warm_s=WARM_S)


# --- the requests ---------------------------------------------------------------------------------


def json_request(x: np.ndarray) -> bytes:
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    return _http(body, {})


def binary_request(x: np.ndarray) -> bytes:
    header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    return _http(header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))})


def _http(body: bytes, headers: dict[str, str]) -> bytes:
    lines = ["POST /v2/models/tiny/infer HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def fixed_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    del environ
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(FIXED)))])
    return [FIXED]


# --- the measurement -------------------------------------------------------------------------------


def measure(seconds: float, rounds: int) -> dict[str, dict[int, dict[str, float]]]:
    """Every arm at every concurrency, ``rounds`` times round-robin; each cell keeps its best round (the
    host's other load only ever slows a round, so the best is the closest to what the stack can do)."""
    from agent_overhead import install_tiny_bundle

    from device_agent.agent import Agent
    from device_agent.fastpath import FastPathSettings
    from device_agent.httpapi import AgentHttpServer, http_settings

    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "device"
        install_tiny_bundle(state_dir, deadline=False, n_features=64, n_classes=10)
        agent = Agent.from_config(environ=dict(os.environ), state_dir=state_dir)
        settings = http_settings(agent.config)
        workers_only = dataclasses.replace(settings, fast_path=FastPathSettings(enabled=False))
        x = np.random.default_rng(0).uniform(0, 1, (1, 64)).astype(np.float32)
        arms = {FIXED_ARM: (AgentHttpServer(agent, port=0, settings=settings, app=fixed_app), json_request(x)),
                "JSON batch-1": (AgentHttpServer(agent, port=0, settings=settings), json_request(x)),
                "binary batch-1": (AgentHttpServer(agent, port=0, settings=settings), binary_request(x)),
                WORKERS_ARM: (AgentHttpServer(agent, port=0, settings=workers_only), json_request(x))}  # fmt: skip
        try:
            for server, _ in arms.values():
                server.start()
            gc.freeze()  # as the daemon does once started (device_agent/daemon.py): start-up objects out of full GCs
            for round_no in range(rounds):
                for name, (server, request) in arms.items():
                    for c in CONCURRENCY:
                        run = _measured_run(server.url, request, c, seconds)
                        best = results.setdefault(name, {}).get(c)
                        if best is None or run["rps"] > best["rps"]:
                            results[name][c] = run
                print(
                    f"round {round_no + 1}/{rounds}:",
                    {n: {c: round(r["rps"]) for c, r in by_c.items()} for n, by_c in results.items()},
                    flush=True,
                )
        finally:
            gc.unfreeze()
            for server, _ in arms.values():
                server.stop()
            agent.close()
    return results


def _measured_run(url: str, request: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    """One closed-loop run, with the server process's CPU time per answer (all its threads)."""
    cpu_began = time.process_time()
    run = run_load(url, request, concurrency, seconds)
    answers = run["rps"] * (seconds + WARM_S)  # the warm-up's answers cost CPU too
    run["cpu_us"] = (time.process_time() - cpu_began) / max(answers, 1) * 1e6
    return run


def table(results: dict[str, dict[int, dict[str, float]]], load: tuple[float, float]) -> tuple[str, bool]:
    fixed = results[FIXED_ARM][64]["rps"]
    rows = ["| request | concurrency | answers/s | p50 ms | p99 ms | p99/p50 | server CPU µs/answer "
            "| vs fixed at c=64 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    met = True
    for name, by_c in results.items():
        targeted = name not in (FIXED_ARM, WORKERS_ARM)
        for c, r in by_c.items():
            spread = r["p99_ms"] / r["p50_ms"]
            ratio = r["rps"] / fixed if c == 64 and name != FIXED_ARM else None
            ok = not targeted or (spread <= 5 and (ratio is None or ratio >= 0.5))
            met = met and ok
            ratio_text = "" if ratio is None else f"{ratio:.2f}x"
            rows.append(f"| {name} | {c} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {spread:.1f} "
                        f"| {r['cpu_us']:.0f} | {ratio_text} {'' if ok else '(target missed)'} |")  # fmt: skip
    host = (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load average "
            f"{load[0]:.1f} at the start and {load[1]:.1f} at the end")  # fmt: skip
    note = (f"\nHost: {host}. Load from another process (asyncio, raw keep-alive sockets), closed loop; every cell "
            f"is the best of its rounds. Targets (the inference rows): at c=64 >= 0.5x the fixed answer's "
            f"throughput; p99 <= 5x p50. The reference row is the JSON request with the fast lane off (every "
            f"request on a worker thread). Requests of a route read in one loop pass are answered by one model call "
            f"(dynamic batching, ADR 0012); start-up objects are frozen out of the garbage collector as the daemon "
            f"does. **{'MET' if met else 'NOT MET'}**.\n")  # fmt: skip
    return "\n".join(rows) + "\n" + note, met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = measure(args.seconds, args.rounds)
    body, met = table(results, (load_before, os.getloadavg()[0]))
    print(body)
    print(f"target (issue 13): {'MET' if met else 'NOT MET'}")
    if not args.no_write:
        write_section(SECTION, "Agent localhost HTTP API under load", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

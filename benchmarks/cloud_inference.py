"""Benchmark: the cloud inference endpoint under batch-1 load, against a naive wrapper and the ceiling.

Two models, both published as signed bundles to a real fleet server (SQLite, TUF) and served by the
endpoint from its repository: the digits CNN as the converter ships it, and a medium model (a wide
MLP, 64 -> 4096 -> 4096 -> 4096 -> 10, 135 MB of fp32 weights: a batch-1 call is a matrix-vector
product per layer that reads every weight, ~10 ms here; a batch of 32 reads them once and costs
little more per call, so batching pays; the table's note gives both rates, measured in process).
Arms, each a uvicorn server with one worker process on loopback:

- (a) ``naive``: a FastAPI wrapper that parses the JSON and calls ``session.run`` per request;
- (b) ``ours, no batching``: ``edgefleet-server inference``'s app with batching off;
- (c) ``ours, batching``: the same with dynamic batching (max batch 32, max delay 2 ms);
- (d) the ceiling: the lower of in-process batched ``session.run`` throughput (batch 32, rows/s, on
  the endpoint's 2 model threads) and the same HTTP stack (uvicorn + FastAPI) answering a fixed response.

The load generator is another process (asyncio on raw keep-alive sockets; closed loop: each client
sends its next request when its answer arrives), batch-1 JSON requests, concurrency 1, 8 and 64.
Targets at concurrency 64: (c) >= 4x (a) on the medium model, and (c) >= 0.7x (d) on both models.

The host is shared with other work, so the four servers of a model run at once and are measured in
turn, ``--rounds`` times round-robin; each cell keeps its best round (the least disturbed), and the
table says the load average.

Run: ``.venv/bin/python benchmarks/cloud_inference.py [--seconds 2 --rounds 3]`` (writes its section of
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loadgen  # noqa: E402
from _mdreport import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "cloud_inference"
CONCURRENCY = (1, 8, 64)
PEPPER = "bench-pepper-0123456789abcdef"
MAX_BATCH = 32
MODEL_THREADS = 2
"""The endpoint's model threads (``EDGEFLEET_INFERENCE_THREADS``), and the ceiling's."""
FIXED = json.dumps({"model_name": "m", "model_version": "1", "outputs": [
    {"name": "label", "shape": [1], "datatype": "BYTES", "data": ["7"]}]}).encode()  # fmt: skip


def run_load(port: int, request: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    return _loadgen.run_load("127.0.0.1", port, request, concurrency, seconds, warm_s=1.0)


def _warm_up(port: int, request: bytes, timeout_s: float = 120.0) -> None:
    """Until the server answers (ours loads the model at its first request: a 135 MB bundle takes seconds)."""
    deadline = time.monotonic() + timeout_s
    while run_load(port, request, 1, 0.5)["rps"] == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} answered nothing within {timeout_s:.0f} s")


def http_request(model: str, name: str, x: np.ndarray, token: str) -> bytes:
    body = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    lines = [f"POST /v2/models/{model}/infer HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
             f"Authorization: Bearer {token}", "Content-Type: application/json"]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- the servers (each in its own process) ----------------------------------------------------------


def naive_app(model_path: str, threads: int) -> Any:
    """(a): parse, ``session.run``, answer JSON; nothing else."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    out_name = session.get_outputs()[0].name
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, request_body: dict[str, Any]) -> Response:
        spec = request_body["inputs"][0]
        x = np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])
        (y,) = session.run([out_name], {spec["name"]: x})
        answer = {"model_name": name, "outputs": [{"name": out_name, "shape": list(y.shape), "datatype": "FP32",
                                                   "data": y.ravel().tolist()}]}  # fmt: skip
        return Response(json.dumps(answer), media_type="application/json")

    return app


def fixed_app() -> Any:
    """(d, HTTP side): the same stack answering a fixed response after reading the body."""
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:  # noqa: ARG001 - the route's shape, as in the others
        await request.body()
        return Response(FIXED, media_type="application/json")

    return app


def serve_main(args: argparse.Namespace) -> int:
    import uvicorn

    if args.serve == "naive":
        app = naive_app(args.model_path, args.threads)
    elif args.serve == "fixed":
        app = fixed_app()
    else:
        from fleet_server.inference.app import create_inference_app
        from fleet_server.inference.settings import load_inference_settings

        app = create_inference_app(load_inference_settings(Path(args.data_dir)))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


@contextlib.contextmanager
def server(port: int, *args: str, env: dict[str, str] | None = None) -> Iterator[None]:
    process = subprocess.Popen([sys.executable, __file__, "--port", str(port), *args],
                               env={**os.environ, **(env or {})})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"server {args} did not start")
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the models and the fleet ------------------------------------------------------------------------


def build_mlp_bundle(bundle_dir: Path) -> Any:
    """The medium model: a wide MLP as an ONNX bundle (golden cases from ONNX Runtime itself)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bundles.archive import sha256_file
    from bundles.manifest import DriftBaseline, FileRef, Golden, GoldenCase, RuntimeConfig, TensorSpec
    from bundles.tensors import encode_tensor
    from bundles.testing import build_bundle_dir, write_manifest

    base = build_bundle_dir(bundle_dir, name="mlp", version=1)
    rng = np.random.default_rng(0)
    sizes = [64, 4096, 4096, 4096, 10]
    nodes, inits, previous = [], [], "x"
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}")]
        out = "logits" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [out if out == "logits" else f"g{i}"]))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        previous = out
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])
    graph = helper.make_graph(nodes, "mlp", [x_info], [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                     ["b", 10])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = bundle_dir / "onnx-fp32" / "model.onnx"
    onnx.save_model(model, str(path))
    x = rng.uniform(-1, 1, (2, 64)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    variant = dataclasses.replace(base.variants[0], files=(FileRef("onnx-fp32/model.onnx", sha256_file(path),
                                                                   path.stat().st_size),))  # fmt: skip
    manifest = dataclasses.replace(
        base, inputs=(TensorSpec("x", "float32", (-1, 64)),), outputs=(TensorSpec("logits", "float32", (-1, 10)),),
        features=(), postprocess=(), variants=(variant,), drift_baseline=DriftBaseline(),
        golden=Golden(cases=(GoldenCase({"x": encode_tensor(x)}, {"logits": encode_tensor(y)}),), atol=1e-3,
                      rtol=1e-3),
        runtime_config=RuntimeConfig(threads=1),
    )  # fmt: skip
    write_manifest(bundle_dir, manifest)
    return manifest


@dataclasses.dataclass
class BenchModel:
    name: str
    label: str
    input_name: str
    input_shape: tuple[int, ...]
    model_path: Path


def arrange_fleet(work: Path) -> tuple[Path, str, list[BenchModel]]:
    """A fleet server data dir with both bundles published; returns it, an admin key and the models."""
    from _digits_cnn import digits_cnn_bundle
    from fastapi.testclient import TestClient

    from bundles.manifest import Manifest
    from fleet_server.app import create_app
    from fleet_server.db import session_scope, upgrade_database
    from fleet_server.services.api_keys import create_api_key
    from fleet_server.settings import Settings
    from tests.fleet_server.inference.conftest import make_release, publish_dir

    data = work / "data"
    data.mkdir(parents=True)
    url = f"sqlite:///{data / 'fleet.db'}"
    upgrade_database(url)
    (data / "server.env").write_text(
        f"EDGEFLEET_DATABASE_URL={url}\nEDGEFLEET_TOKEN_PEPPER={PEPPER}\nEDGEFLEET_PUBLIC_URL=https://bench.test\n"
        "EDGEFLEET_BACKGROUND_TASKS=false\nEDGEFLEET_LOG_LEVEL=warning\n"
    )
    settings = Settings(data_dir=data, database_url=url, token_pepper=PEPPER, public_url="https://bench.test",
                        background_tasks=False, log_level="warning")  # fmt: skip
    digits_dir, _ = digits_cnn_bundle(work / "digits")
    digits = Manifest.from_bytes((digits_dir / "manifest.json").read_bytes())
    mlp = build_mlp_bundle(work / "mlp")
    with TestClient(create_app(settings)) as client:
        with session_scope(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
            _, key = create_api_key(session, name="bench", role="admin", actor="bench", pepper=PEPPER)
        (work / "release").mkdir()
        release = make_release(client, {"Authorization": f"Bearer {key}"}, work / "release")
        publish_dir(release, digits_dir, digits)
        publish_dir(release, work / "mlp", mlp)
    models = [
        BenchModel("digits", "digits CNN", digits.inputs[0].name, (1, *digits.inputs[0].shape[1:]),
                   digits_dir / digits.variants[0].entry),
        BenchModel("mlp", "wide MLP (medium)", "x", (1, 64), work / "mlp" / "onnx-fp32" / "model.onnx"),
    ]  # fmt: skip
    return data, key, models


def in_process_rows_per_s(model: BenchModel, batch: int, threads: int, seconds: float) -> float:
    """In-process ``session.run`` throughput (rows/s) at ``batch`` rows a call on ``threads`` threads."""
    import concurrent.futures

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model.model_path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 1, (batch, *model.input_shape[1:])).astype(np.float32)
    session.run(None, {model.input_name: x})

    def spin(stop_at: float) -> int:
        n = 0
        while time.perf_counter() < stop_at:
            session.run(None, {model.input_name: x})
            n += 1
        return n

    stop_at = time.perf_counter() + seconds
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        calls = sum(pool.map(spin, [stop_at] * threads))
    return calls * batch / seconds


# --- the measurement -------------------------------------------------------------------------------


def measure(
    seconds: float, rounds: int
) -> tuple[dict[str, dict[str, dict[int, dict[str, float]]]], dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    ceilings: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, key, models = arrange_fleet(Path(tmp))
        for model in models:
            x = np.random.default_rng(1).uniform(0, 1, model.input_shape).astype(np.float32)
            request = http_request(model.name, model.input_name, x, key)
            results[model.name] = measure_arms(model, data, request, seconds, rounds)
            fixed = results[model.name]["fixed response (same HTTP stack)"][64]["rps"]
            ceilings[model.name] = in_process_rates(model, seconds, rounds) | {"fixed_http_rps": fixed}
            ceilings[model.name]["ceiling"] = min(ceilings[model.name]["batched_rows_per_s"], fixed)
        labels = {m.name: m.label for m in models}
    return {labels[k]: v for k, v in results.items()}, {labels[k]: v for k, v in ceilings.items()}


def measure_arms(
    model: BenchModel, data: Path, request: bytes, seconds: float, rounds: int
) -> dict[str, dict[int, dict[str, float]]]:
    """Every arm's servers up at once, measured in turn, ``rounds`` times round-robin; each cell its best round.

    The host is shared: other processes come and go for seconds at a time. Interleaving the arms
    spreads that over all of them, and the best round of each is the one least disturbed.
    """
    arms: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
        "(a) naive FastAPI + session.run": (("--serve", "naive", "--model-path", str(model.model_path)), {}),
        "(b) ours, no batching": (("--serve", "ours", "--data-dir", str(data)),
                                  {"EDGEFLEET_INFERENCE_BATCHING": "false"}),
        "(c) ours, dynamic batching": (("--serve", "ours", "--data-dir", str(data)),
                                       {"EDGEFLEET_INFERENCE_MAX_BATCH_SIZE": str(MAX_BATCH),
                                        "EDGEFLEET_INFERENCE_MAX_QUEUE_DELAY_US": "2000",
                                        "EDGEFLEET_INFERENCE_THREADS": str(MODEL_THREADS)}),
        "fixed response (same HTTP stack)": (("--serve", "fixed"), {}),
    }  # fmt: skip
    ports = {arm: free_port() for arm in arms}
    best: dict[str, dict[int, dict[str, float]]] = {arm: {} for arm in arms}
    with contextlib.ExitStack() as stack:
        for arm, (args, env) in arms.items():
            stack.enter_context(server(ports[arm], *args, env=env))
            _warm_up(ports[arm], request)
        for _ in range(rounds):
            for concurrency in CONCURRENCY:
                for arm in arms:
                    row = run_load(ports[arm], request, concurrency, seconds)
                    if row["rps"] > best[arm].get(concurrency, {"rps": -1.0})["rps"]:
                        best[arm][concurrency] = row
    for arm, by_c in best.items():
        print(arm, model.name, {c: round(r["rps"]) for c, r in by_c.items()}, flush=True)
    return best


def in_process_rates(model: BenchModel, seconds: float, rounds: int) -> dict[str, float]:
    """The in-process rates (best of ``rounds``): the ceiling's batched one, and batch 1 against batched."""
    best = {"batched_rows_per_s": 0.0, "one_thread_batch_1": 0.0, "one_thread_batched": 0.0}
    for _ in range(rounds):
        found = {"batched_rows_per_s": in_process_rows_per_s(model, MAX_BATCH, MODEL_THREADS, seconds),
                 "one_thread_batch_1": in_process_rows_per_s(model, 1, 1, seconds),
                 "one_thread_batched": in_process_rows_per_s(model, MAX_BATCH, 1, seconds)}  # fmt: skip
        best = {k: max(v, found[k]) for k, v in best.items()}
    return best


def table(
    results: dict[str, Any], ceilings: dict[str, dict[str, float]], load: tuple[float, float], rounds: int
) -> tuple[str, bool]:
    lines = [f"Host: {platform.machine()}, {os.cpu_count()} cores shared with other workers (load average "
             f"{load[0]:.1f} at the start, {load[1]:.1f} at the end), Python {platform.python_version()}; one "
             "uvicorn worker per arm, load generator in another process, batch-1 JSON requests; arms "
             f"interleaved, each cell the best of {rounds} rounds.", "",
             "| model | arm | c=1 rps | c=8 rps | c=64 rps | c=64 p50 ms | c=64 p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    ok = True
    verdicts = []
    for model, rows in results.items():
        for arm, by_c in rows.items():
            lines.append(f"| {model} | {arm} | {by_c[1]['rps']:.0f} | {by_c[8]['rps']:.0f} | {by_c[64]['rps']:.0f} "
                         f"| {by_c[64]['p50_ms']:.2f} | {by_c[64]['p99_ms']:.2f} |")  # fmt: skip
        ceiling = ceilings[model]
        ours = rows["(c) ours, dynamic batching"][64]["rps"]
        naive = rows["(a) naive FastAPI + session.run"][64]["rps"]
        vs_ceiling = ours / ceiling["ceiling"]
        verdicts.append(f"- {model}: in process, one thread: batch-1 {ceiling['one_thread_batch_1']:.0f} rows/s, "
                        f"batch-{MAX_BATCH} {ceiling['one_thread_batched']:.0f} rows/s "
                        f"({ceiling['one_thread_batched'] / ceiling['one_thread_batch_1']:.1f}x). "
                        f"(d) ceiling = min(batched session.run on {MODEL_THREADS} threads "
                        f"{ceiling['batched_rows_per_s']:.0f} rows/s, "
                        f"fixed response {ceiling['fixed_http_rps']:.0f} rps) = {ceiling['ceiling']:.0f}; "
                        f"(c)/(d) = {vs_ceiling:.2f} (target >= 0.7: {'met' if vs_ceiling >= 0.7 else 'NOT met'}); "
                        f"(c)/(a) = {ours / naive:.1f}x")  # fmt: skip
        ok = ok and vs_ceiling >= 0.7
        if "medium" in model:
            verdicts[-1] += f" (target >= 4x: {'met' if ours / naive >= 4 else 'NOT met'})"
            ok = ok and ours / naive >= 4
    notes = [] if ok else ["", "Targets not met here, and what bounds them on this host (per-request CPU of the "
                               "protocol work against a fixed answer; two model threads on two shared cores): "
                               "[ADR 0009](adr/0009-cloud-inference.md#what-was-measured)."]  # fmt: skip
    return "\n".join(lines + ["", "Targets at concurrency 64:", *verdicts, *notes]), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes; each cell keeps its best")
    parser.add_argument("--serve", choices=["naive", "ours", "fixed"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_main(args)
    load_before = os.getloadavg()[0]
    results, ceilings = measure(args.seconds, args.rounds)
    load = (load_before, os.getloadavg()[0])
    body, ok = table(results, ceilings, load, args.rounds)
    print(body)
    write_section(SECTION, "Cloud inference endpoint under load", body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

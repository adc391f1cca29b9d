"""Benchmark: the language-model path on the tiny Llama (converter gates per variant; agent vs llama-cpp-python).

1. Per GGUF variant of the tiny Llama (``converter.llm.tiny``, converted by ``convert_llm``): size,
   mean KL divergence and top-token agreement against transformers, perplexity ratio, decode tokens/s
   and time to first token, as the converter's gates measured them; the size of q4_k_m against f16.
2. q4_k_m with and without the importance matrix from the calibration text (``converter.llm.imatrix``):
   the same tiny Llama registered a second time without ``--calibration-text`` and converted to
   q4_k_m alone; the same gate figures, with f16 as the reference row.
3. The agent's local ``/v1/chat/completions`` (waitress, the serving path, telemetry on) against
   llama-cpp-python's own ``Llama.create_chat_completion`` on the same q4_k_m file, the same chat
   messages, greedy, the same token budget and thread count: completion tokens per second of wall
   time per request, calls interleaved, medians of the same run.

Targets: the agent's endpoint within 10 % of direct llama-cpp-python tokens/s; q4_k_m at most 35 % of
the f16 size. Run: ``.venv/bin/python benchmarks/llm.py`` (writes its section of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mdreport import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "llm"
MESSAGES = [{"role": "user", "content": "This program is free software; you can redistribute it"}]


def convert(work: Path) -> tuple[list[dict[str, Any]], Path, dict[str, Any]]:
    """Register and convert the tiny Llama in a private home; the variants' results, the bundle, plain q4_k_m.

    The last is the q4_k_m result of a second registration without calibration text (no importance matrix).
    """
    from converter.home import Home
    from converter.llm.convert import convert_llm
    from converter.llm.register import LlmSettings, register_llm
    from converter.llm.tiny import tiny_llama
    from converter.registry import Registry

    source = tiny_llama(Path(tempfile.gettempdir()) / "edgefleet-bench-cache")
    os.environ["EDGEFLEET_HOME"] = str(work / "home")
    registry = Registry(Home.from_env())
    model = register_llm(registry, "tiny-llm", source, source / "eval.txt", source / "calibration.txt", LlmSettings())
    outcome = convert_llm(registry, model, ("f16", "q8_0", "q4_k_m"))
    plain_model = register_llm(registry, "tiny-llm-plain", source, source / "eval.txt", None, LlmSettings())
    plain = convert_llm(registry, plain_model, ("q4_k_m",)).results[-1].to_dict()
    return [r.to_dict() for r in outcome.results], outcome.bundle_path, plain


def imatrix_table(results: list[dict[str, Any]], plain: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """f16, q4_k_m without and q4_k_m with the importance matrix: the gate figures side by side."""
    by_id = {r["variant_id"]: r for r in results}
    rows = [("gguf-f16", "-", by_id["gguf-f16"]), ("gguf-q4_k_m", "none", plain),
            ("gguf-q4_k_m", "calibration text", by_id["gguf-q4_k_m"])]  # fmt: skip
    lines = ["| variant | importance matrix | size (bytes) | mean KL | top-1 agreement | ppl ratio |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for variant, imatrix, r in rows:
        m = r["metrics"]
        lines.append(f"| {variant} | {imatrix} | {m['size_bytes']:,} | {m['kl_mean']:.5f} | "
                     f"{m['top1_agreement']:.4f} | {m['ppl_ratio']:.4f} |")  # fmt: skip
    return "\n".join(lines), by_id["gguf-q4_k_m"]["metrics"]["imatrix"]


def variants_table(results: list[dict[str, Any]]) -> tuple[str, float]:
    columns = ("variant", "status", "size (bytes)", "mean KL", "top-1 agreement", "ppl ratio", "tokens/s", "TTFT ms",
               "tensor types")  # fmt: skip
    header = "| " + " | ".join(columns) + " |"
    rows = [header, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    sizes = {}
    for r in results:
        m = r["metrics"]
        sizes[r["precision"]] = m["size_bytes"]
        types = ", ".join(f"{k} {v}" for k, v in m["tensor_types"].items())
        rows.append(f"| {r['variant_id']} | {r['status']} | {m['size_bytes']:,} | {m['kl_mean']:.5f} | "
                    f"{m['top1_agreement']:.4f} | {m['ppl_ratio']:.4f} | {m['tokens_per_s']:.0f} | "
                    f"{m['ttft_ms']:.2f} | {types} |")  # fmt: skip
    return "\n".join(rows), sizes["q4_k_m"] / sizes["f16"]


def agent_vs_direct(bundle: Path, work: Path, rounds: int, max_tokens: int) -> dict[str, float]:
    """Median completion tokens/s over wall time: the agent's chat endpoint and llama-cpp-python directly."""
    import httpx

    from bundles.archive import open_bundle
    from bundles.runtimes.llama_cpp import open_llama
    from device_agent.agent import Agent
    from device_agent.httpapi import AgentHttpServer

    manifest, root = open_bundle(bundle, work / "bundle")
    variant = manifest.variant("gguf-q4_k_m")
    threads = manifest.runtime_config.threads
    agent = Agent.from_config(environ={}, state_dir=work / "agent")
    agent.engine.load("tiny-llm", root, variant.id)
    server = AgentHttpServer(agent, "127.0.0.1", 0).start()
    direct = open_llama(root / variant.entry, n_ctx=0, n_threads=threads, n_threads_batch=threads, seed=0)
    body = {"model": "tiny-llm", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    rates: dict[str, list[float]] = {"agent": [], "direct": []}
    tokens: dict[str, list[int]] = {"agent": [], "direct": []}
    try:
        with httpx.Client(timeout=60) as http:
            for _ in range(rounds):
                started = time.perf_counter()
                answer = http.post(f"{server.url}/v1/chat/completions", json=body).json()
                rates["agent"].append(answer["usage"]["completion_tokens"] / (time.perf_counter() - started))
                tokens["agent"].append(answer["usage"]["completion_tokens"])
                started = time.perf_counter()
                plain = direct.create_chat_completion(messages=MESSAGES, max_tokens=max_tokens, temperature=0.0,
                                                      top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)  # fmt: skip
                rates["direct"].append(plain["usage"]["completion_tokens"] / (time.perf_counter() - started))
                tokens["direct"].append(plain["usage"]["completion_tokens"])
    finally:
        server.stop()
        agent.close()
        direct.close()
    medians = {path: statistics.median(values) for path, values in rates.items()}
    medians.update({f"{path}_tokens": statistics.median(values) for path, values in tokens.items()})
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-llm-") as tmp:
        work = Path(tmp)
        results, bundle, plain = convert(work)
        table, size_ratio = variants_table(results)
        with_imatrix, imatrix = imatrix_table(results, plain)
        speed = agent_vs_direct(bundle, work, args.rounds, args.max_tokens)
    ratio = speed["agent"] / speed["direct"]
    with_m = next(r for r in results if r["variant_id"] == "gguf-q4_k_m")["metrics"]
    kl_change = with_m["kl_mean"] / plain["metrics"]["kl_mean"] - 1
    body = "\n".join([
        "Tiny Llama (hidden 256, 2 layers, vocabulary 512, trained here), gated against transformers on its",
        "held-out licence text (1,033 positions). Timings on this machine (2 cores, shared).",
        "",
        table,
        "",
        f"q4_k_m / f16 size: **{size_ratio:.1%}** (target at most 35 %: {'met' if size_ratio <= 0.35 else 'NOT met'}).",
        "",
        f"q4_k_m with the importance matrix from the calibration text ({imatrix['tokens']:,} tokens in "
        f"{imatrix['chunks']} chunks, {imatrix['entries']} matrices) and without it (the same model registered "
        "without `--calibration-text`); figures against transformers on the same evaluation text:",
        "",
        with_imatrix,
        "",
        f"Mean KL with / without the importance matrix: **{kl_change:+.1%}**.",
        "",
        f"Chat on q4_k_m, greedy, up to {args.max_tokens} tokens, {args.rounds} interleaved requests each "
        "(completion tokens / wall time of the request):",
        "",
        "| path | completion tokens (median) | tokens/s (median) |",
        "|---|---:|---:|",
        f"| llama-cpp-python `create_chat_completion` | {speed['direct_tokens']:.0f} | {speed['direct']:.0f} |",
        f"| agent `POST /v1/chat/completions` (HTTP, serving path, telemetry) | {speed['agent_tokens']:.0f} | "
        f"{speed['agent']:.0f} |",
        "",
        f"Agent / direct: **{ratio:.2f}** (target at least 0.90: {'met' if ratio >= 0.9 else 'NOT met'}).",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Command: `.venv/bin/python benchmarks/llm.py`",
    ])  # fmt: skip
    print(body)
    if not args.no_write:
        write_section(SECTION, "Language models (benchmarks/llm.py)", body)


if __name__ == "__main__":
    main()

"""Fleet-server capacity per node: desired-state polls and steady agent uploads, SQLite and PostgreSQL.

The server runs as a user runs it, in its own process group (``edgefleet-server run --workers
WORKERS``: uvicorn worker processes, loopback), and the load generator in another process (raw
asyncio HTTP/1.1 keep-alive connections, so the client costs as little CPU as possible). For each
database, in the same run:

1. **baseline**: ``GET /healthz`` on the same stack (same workers, middleware and load generator), a
   fixed response with no database: the ceiling of this stack on this machine;
2. **polls**: ``N_DEVICES`` accepted devices with an assignment each, polling their desired state at a
   realistic mix: 95 % carry the device's current ETag (-> 304), 5 % do not (-> 200 with the body);
3. **steady agent uploads**: what an agent sends every upload interval (one gzip batch: a metric
   window, a heartbeat and one sampled prediction, each from another device with a fresh batch id),
   posted on several connections; stored batches per second.

Reported: each against the baseline, and devices per node at the documented intervals (a poll every
``POLL_INTERVAL_S``, an upload every ``UPLOAD_INTERVAL_S``), for polls alone, uploads alone and both
together (the node's time shared between them).

Usage: ``python benchmarks/server_polls.py [--seconds 8] [--devices 20000] [--backends sqlite,postgresql]``.
Writes its table to ``docs/benchmarks.md`` between ``<!-- BEGIN server_polls -->`` and ``<!-- END ... -->``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mdreport import write_section  # noqa: E402
from _scratchdb import create_database, drop_database  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEPPER = "bench-pepper-0123456789abcdefghij"
CONCURRENCY = 32
NOT_MODIFIED_SHARE = 0.95
UPLOAD_CONNECTIONS = 16
WORKERS = 2
POLL_INTERVAL_S = 300
UPLOAD_INTERVAL_S = 60
AT = "2026-11-29T12:00:00+00:00"
AT_END = "2026-11-29T12:01:00+00:00"
LAST_SEEN_FLUSH_WAIT_S = 6.0


# --- set-up -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seed_devices(url: str, n_devices: int) -> list[str]:
    """Insert accepted devices with one assignment each (bulk); returns their access tokens."""
    from sqlalchemy import insert

    from fleet_server.db import make_engine, utcnow
    from fleet_server.models import Assignment, Device
    from fleet_server.security import DEVICE_TOKEN_PREFIX, hash_secret, new_secret

    tokens = [new_secret(DEVICE_TOKEN_PREFIX) for _ in range(n_devices)]
    now = utcnow()
    caps = {"arch": "aarch64", "os": "linux", "runtimes": {"onnxruntime": "1.20.1"}}
    devices = [{"id": f"dev-{i:016x}", "public_key": secrets.token_hex(32), "fleet": "bench", "status": "accepted",
                "token_hash": hash_secret(t, PEPPER), "hw_class": "pi4", "arch": "aarch64", "capabilities": caps,
                "installed": [], "enrolled_at": now, "updated_at": now} for i, t in enumerate(tokens)]  # fmt: skip
    assignments = [{"device_id": d["id"], "model_name": "digits", "bundle_version": 3, "pinned": False,
                    "updated_at": now} for d in devices]  # fmt: skip
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(insert(Device), devices)
        connection.execute(insert(Assignment), assignments)
    engine.dispose()
    return tokens


def start_server(url: str, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EDGEFLEET_MODE": "production", "EDGEFLEET_TOKEN_PEPPER": PEPPER,
           "EDGEFLEET_PUBLIC_URL": "https://bench.test", "EDGEFLEET_DATABASE_URL": url,
           "EDGEFLEET_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "fleet_server.cli", "run", "--data-dir", str(data_dir), "--port", str(port),
           "--workers", str(WORKERS)]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                time.sleep(1.0)  # every worker up
                return server
        except OSError:
            if server.poll() is not None:
                stderr = server.stderr.read().decode()[-2000:] if server.stderr else ""
                raise RuntimeError(f"server exited: {stderr}") from None
            time.sleep(0.05)
    os.killpg(server.pid, 9)
    raise RuntimeError("server did not start within 30 s")


# --- the load generator (runs in its own process) ----------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection with the smallest possible client overhead."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes, dict[str, str]]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        length = int(headers.get("content-length", "0"))
        body = await self.reader.readexactly(length) if length else b""
        return status, body, headers


def poll_request(token: str, etag: str | None) -> bytes:
    extra = f"If-None-Match: {etag}\r\n" if etag else ""
    return (f"GET /api/v1/device/desired-state HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
            f"{extra}\r\n").encode()  # fmt: skip


async def learn_etags(port: int, tokens: list[str]) -> list[str]:
    connections = [await Connection.open(port) for _ in range(CONCURRENCY)]
    etags: list[str] = [""] * len(tokens)

    async def worker(k: int) -> None:
        for i in range(k, len(tokens), CONCURRENCY):
            status, _, headers = await connections[k].request(poll_request(tokens[i], None))
            assert status == 200, status
            etags[i] = headers["etag"]

    await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
    return etags


async def run_load(port: int, requests: list[bytes], seconds: float) -> dict[str, Any]:
    """Send random requests from ``requests`` on CONCURRENCY connections for ``seconds``."""
    connections = [await Connection.open(port) for _ in range(CONCURRENCY)]
    latencies_s: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def worker(connection: Connection, rng: random.Random) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status, _, _ = await connection.request(requests[rng.randrange(len(requests))])
            latencies_s.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c, random.Random(i)) for i, c in enumerate(connections)))
    elapsed = time.perf_counter() - started
    return summarise(latencies_s, statuses, elapsed)


def summarise(latencies_s: list[float], statuses: dict[int, int], elapsed_s: float) -> dict[str, Any]:
    ordered = sorted(latencies_s)
    total = len(ordered)
    return {"requests": total, "per_s": total / elapsed_s, "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(total - 1, int(total * 0.99))], "statuses": statuses,
            "not_modified_share": statuses.get(304, 0) / total if total else 0.0}  # fmt: skip


def agent_batch(rng: random.Random) -> bytes:
    """What an agent uploads every interval: one window, one heartbeat, one sampled prediction (gzip)."""
    counts = [0] * 72
    counts[23], counts[24] = 40, 20
    window = {"id": uuid.uuid4().hex, "model": "digits", "version": 3, "start": AT, "end": AT_END,
              "counters": {"requests": 60, "rows": 60, "errors": 0, "fallbacks": 1, "low_confidence": 0,
                           "sources": {"local": 59, "cloud": 1}, "fallback_reasons": {"deadline": 1},
                           "violations": {"nan_output": 0, "output_out_of_range": 0, "input_out_of_range": 0,
                                          "unknown_category": 0}, "captured": {"rate": 1}},
              "latency_ms": {"counts": counts}, "features": {f"f{i}": [3, 9, 20, 15, 8, 3, 1, 1] for i in range(4)},
              "output": {"label": [20, 25, 15]}, "shadow": {"compared": 0, "agreed": 0, "errors": 0,
                                                            "latency_ms_sum": 0.0}}  # fmt: skip
    heartbeat = {
        "id": uuid.uuid4().hex,
        "type": "heartbeat",
        "at": AT,
        "model": None,
        "version": None,
        "uptime_s": 3600,
        "models": [{"name": "digits", "version": 3, "state": "active"}],
        "health": "ok",
    }
    sample = {"id": uuid.uuid4().hex, "at": AT, "model": "digits", "version": 3, "source": "local",
              "capture_reason": "rate", "inclusion_probability": 0.01,
              "inputs": {"x": {"dtype": "float32", "shape": [1, 4], "data": [round(rng.random(), 4)] * 4}},
              "outputs": {"label": {"dtype": "string", "shape": [1], "data": [str(rng.randrange(10))]}},
              "latency_ms": 1.9, "fallback_reason": None, "confidence": 0.93}  # fmt: skip
    batch = {"batch_id": uuid.uuid4().hex, "events": [heartbeat], "windows": [window], "samples": [sample]}
    return gzip.compress(json.dumps(batch).encode())


async def run_uploads(port: int, tokens: list[str], seconds: float) -> dict[str, Any]:
    """Steady agent uploads on a few connections, each from the next device; stored batches per second."""
    rng = random.Random(7)
    bodies = [agent_batch(rng) for _ in range(64)]
    connections = [await Connection.open(port) for _ in range(UPLOAD_CONNECTIONS)]
    stored, latencies_s, statuses = 0, [], {}
    deadline = time.perf_counter() + seconds
    next_device = iter(range(10**9))

    async def worker(connection: Connection) -> None:
        nonlocal stored
        while time.perf_counter() < deadline:
            n = next(next_device)
            body, token = bodies[n % len(bodies)], tokens[n % len(tokens)]
            if n >= len(tokens):  # a device's second upload: a new batch id, as the agent's next batch has
                body = gzip.compress(gzip.decompress(body).replace(b'"batch_id": "', f'"batch_id": "{n}-'.encode()))
            raw = (f"POST /api/v1/device/telemetry HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
                   f"Content-Encoding: gzip\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                   ).encode() + body  # fmt: skip
            started = time.perf_counter()
            status, answer, _ = await connection.request(raw)
            latencies_s.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200 and not json.loads(answer)["duplicate"]:
                stored += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    return {**summarise(latencies_s, statuses, elapsed), "stored_per_s": stored / elapsed}


def loadgen_main(args: argparse.Namespace) -> None:
    """The load generator process: read tokens, run every phase, print JSON results."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    tokens = json.loads(Path(args.tokens_file).read_text())
    results = asyncio.run(loadgen_phases(args.port, tokens, args.seconds))
    print(json.dumps(results))


async def loadgen_phases(port: int, tokens: list[str], seconds: float) -> dict[str, Any]:
    etags = await learn_etags(port, tokens)
    await asyncio.sleep(LAST_SEEN_FLUSH_WAIT_S)  # let the server write the learning polls' last-seen times first
    rng = random.Random(1)
    mixed = [
        poll_request(token, etag if rng.random() < NOT_MODIFIED_SHARE else None)
        for token, etag in zip(tokens, etags, strict=True)
    ]
    healthz = [b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"]
    return {
        "baseline": await run_load(port, healthz, seconds),
        "polls": await run_load(port, mixed, seconds),
        "uploads": await run_uploads(port, tokens, seconds),
    }


# --- orchestration -------------------------------------------------------------------------------


def bench_backend(backend: str, n_devices: int, seconds: float) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    result = _bench_backend(backend, n_devices, seconds)
    result["load_avg_1m"] = (load_before, os.getloadavg()[0])
    return result


def _bench_backend(backend: str, n_devices: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"edgefleet-bench-{backend}-") as tmp:
        work = Path(tmp)
        url, pg_name = create_database(backend, work)
        try:
            tokens = seed_devices(url, n_devices)
            tokens_file = work / "tokens.json"
            tokens_file.write_text(json.dumps(tokens))
            port = free_port()
            server = start_server(url, work / "data", port)
            try:
                out = subprocess.run([sys.executable, __file__, "--loadgen", "--port", str(port), "--tokens-file",
                                      str(tokens_file), "--seconds", str(seconds)],
                                     check=True, capture_output=True, text=True)  # fmt: skip
                return dict(json.loads(out.stdout.strip().splitlines()[-1]))
            finally:
                os.killpg(server.pid, 15)
                server.wait(timeout=30)
        finally:
            drop_database(pg_name)


def devices_per_node(polls_per_s: float, uploads_per_s: float) -> tuple[float, float, float]:
    """Devices a node serves at the documented intervals: by polls alone, uploads alone, and both sharing it."""
    by_polls, by_uploads = polls_per_s * POLL_INTERVAL_S, uploads_per_s * UPLOAD_INTERVAL_S
    both = 1 / (1 / by_polls + 1 / by_uploads) if by_polls and by_uploads else 0.0
    return by_polls, by_uploads, both


def table(results: dict[str, dict[str, Any]], n_devices: int, seconds: float) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}; server = "
        f"`edgefleet-server run --workers {WORKERS}`, load generator = another process on loopback "
        f"({CONCURRENCY} keep-alive connections for polls, {UPLOAD_CONNECTIONS} for uploads), {n_devices:,} devices, "
        f"{seconds:g} s per phase. Command: `python benchmarks/server_polls.py`.",
        "",
        "| database | baseline: fixed response req/s | polls/s (95% 304) | x baseline | poll p99 ms | steady agent "
        "uploads/s | x baseline | upload p99 ms | devices per node: polls / uploads / both | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, r in results.items():
        base, polls, uploads = r["baseline"]["per_s"], r["polls"], r["uploads"]
        by_polls, by_uploads, both = devices_per_node(polls["per_s"], uploads["stored_per_s"])
        lines.append(
            f"| {backend} | {base:,.0f} | **{polls['per_s']:,.0f}** | {polls['per_s'] / base:.2f} | "
            f"{polls['p99_ms']:.1f} | **{uploads['stored_per_s']:,.0f}** | {uploads['stored_per_s'] / base:.2f} | "
            f"{uploads['p99_ms']:.1f} | {by_polls:,.0f} / {by_uploads:,.0f} / **{both:,.0f}** | "
            f"{r['load_avg_1m'][0]:.1f} / {r['load_avg_1m'][1]:.1f} |"
        )
    lines += [
        "",
        f"Devices per node: a device polls every {POLL_INTERVAL_S} s and uploads every {UPLOAD_INTERVAL_S} s (the",
        "defaults); `both` shares the node's time between the two (1 / (1/polls-devices + 1/upload-devices)).",
        "Targets on PostgreSQL: polls >= 0.6x the baseline, >= 1,500 steady uploads/s. The load average",
        "(before / after) shows what else ran: above 2 the server, the load generator and PostgreSQL shared two",
        "cores with other work, which lowers every column including the baseline.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--no-write", action="store_true", help="Print only; do not update docs/benchmarks.md.")
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main(args)
        return
    results = {backend: bench_backend(backend, args.devices, args.seconds) for backend in args.backends.split(",")}
    text = table(results, args.devices, args.seconds)
    print(text)
    print(json.dumps(results, indent=1))
    if not args.no_write:
        write_section("server_polls", "Fleet server: desired-state polls and telemetry intake", text)


if __name__ == "__main__":
    main()

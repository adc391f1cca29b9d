"""The load generator the HTTP benchmarks share: closed-loop clients on raw keep-alive sockets.

Run in its own process (``run_load`` starts it), so that the server under test and the client do not
share an interpreter: each of ``concurrency`` asyncio clients sends the same raw HTTP/1.1 request,
reads the answer (``Content-Length``), and sends the next; latencies are kept after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


async def _client(host: str, port: int, request: bytes, stop_at: float, warm_until: float, out: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the server answered {head[:60]!r}")
            if start >= warm_until:
                out.append(time.perf_counter() - start)
    finally:
        writer.close()


async def _load(host: str, port: int, request: bytes, concurrency: int, seconds: float, warm_s: float) -> list[float]:
    now = time.perf_counter()
    latencies: list[float] = []
    await asyncio.gather(*(_client(host, port, request, now + warm_s + seconds, now + warm_s, latencies)
                           for _ in range(concurrency)))  # fmt: skip
    return latencies


def run_load(
    host: str, port: int, request: bytes, concurrency: int, seconds: float, warm_s: float = 0.5
) -> dict[str, float]:
    """Requests per second, p50 and p99 (ms) of ``concurrency`` clients for ``seconds`` after ``warm_s``."""
    with tempfile.NamedTemporaryFile(suffix=".http") as handle:
        handle.write(request)
        handle.flush()
        done = subprocess.run([sys.executable, __file__, "--host", host, "--port", str(port), "--request", handle.name,
                               "--concurrency", str(concurrency), "--seconds", str(seconds), "--warm", str(warm_s)],
                              capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr[-600:]}")
    result = json.loads(done.stdout)
    lat = sorted(result["latencies"])
    if not lat:  # nothing answered after the warm-up (a server still loading)
        return {"rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"rps": len(lat) / result["seconds"], "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request", required=True, help="a file holding the raw HTTP request")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warm", type=float, default=0.5)
    args = parser.parse_args()
    request = Path(args.request).read_bytes()
    latencies = asyncio.run(_load(args.host, args.port, request, args.concurrency, args.seconds, args.warm))
    print(json.dumps({"seconds": args.seconds, "latencies": latencies}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

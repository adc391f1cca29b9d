"""The server as a user runs it: ``edgefleet-server run`` in its own process(es), on a free port.

Used by the tests that need real worker processes (exactly-once background work, several workers'
metrics, the database going away). ``ServerProcess.kill()`` sends SIGKILL to the whole process group
(uvicorn's supervisor and its workers), as a crashed node would die.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.fleet_server.conftest import TEST_PEPPER

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One ``edgefleet-server run`` (with ``workers`` worker processes)."""

    def __init__(self, database_url: str, data_dir: Path, workers: int = 1, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "EDGEFLEET_MODE": "production", "EDGEFLEET_TOKEN_PEPPER": TEST_PEPPER,
                       "EDGEFLEET_PUBLIC_URL": "https://fleet.test", "EDGEFLEET_DATABASE_URL": database_url,
                       "EDGEFLEET_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT), **env}  # fmt: skip
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        command = [sys.executable, "-m", "fleet_server.cli", "run", "--data-dir", str(data_dir), "--port",
                   str(self.port), "--workers", str(workers)]  # fmt: skip
        self.log_path = data_dir / f"server-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the server did not answer within 30 s")

    def metric(self, name: str, timeout_s: float = 5.0) -> float:
        """The sum of a metric's samples in one scrape of ``/metrics``."""
        text = httpx.get(f"{self.url}/metrics", timeout=timeout_s).text
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
        return sum(float(value) for value in pattern.findall(text))

    def metric_in_scrapes(self, name: str, scrapes: int = 16) -> list[float]:
        """:meth:`metric` in ``scrapes`` scrapes sent at once on separate connections, so that every worker
        process answers some of them (a worker's own registry would show only what that worker counted)."""
        with ThreadPoolExecutor(scrapes) as pool:
            return list(pool.map(lambda _: self.metric(name, timeout_s=15.0), range(scrapes)))

    def kill(self) -> None:
        """SIGKILL to the supervisor and every worker (no shutdown hook runs)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

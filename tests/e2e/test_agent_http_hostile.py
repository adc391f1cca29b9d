"""Hostile and careless clients against the real agent daemon's localhost API (a separate process).

The device has tiny@1 installed (input ``x``: up to 64 rows of 4 floats) and a second model ``wide``
whose input has no bounded dimension (so only the device's memory budget limits it), and its saved
desired state names a cloud fallback (a real OIP server on loopback that counts what it is sent).
Each row of the issue's table is a test here; the last one runs the daemon in a memory-limited cgroup.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bundles.manifest import Manifest
from bundles.predictor import Predictor
from tests.device_agent.e2e_support import REPO_ROOT, agent_env, free_port
from tests.device_agent.helpers import VARIANT, DirectorySource, entry, publish_bundle
from tests.device_agent.telemetry.oip_server import OipServer

GOOD = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]})


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from device_agent.agent import Agent

    work = tmp_path_factory.mktemp("hostile")
    targets = work / "targets"
    manifest = publish_bundle(targets, work, "tiny", 1)
    state_dir = work / "device"
    agent = Agent.from_config(environ={}, state_dir=state_dir, min_free_disk_bytes=0, health_runs=2)
    agent.updater.set_source(DirectorySource(targets, state_dir / "cache"))
    agent.updater.apply({"models": [entry("tiny", 1)]})
    agent.close()
    slot = state_dir / "models" / "tiny" / "slot_a"
    with Predictor.load(Manifest.from_bytes((slot / "manifest.json").read_bytes()), slot, variant=VARIANT) as model:
        with OipServer({"tiny": model}) as cloud:
            desired = {"models": [entry("tiny", 1)], "fallback": {"url": cloud.url, "model": "tiny"}}
            (state_dir / "desired.json").write_text(json.dumps({"state": desired, "etag": '"1"'}))
            with running_daemon(state_dir, http_read_timeout_s=1, http_idle_timeout_s=5) as url:
                yield {"url": url, "cloud": cloud, "manifest": manifest, "state_dir": state_dir}


@contextlib.contextmanager
def running_daemon(state_dir: Path, cgroup: Path | None = None, **settings: Any) -> Iterator[str]:
    port = free_port()
    log_path = state_dir.parent / f"daemon-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--port", str(port)], env=agent_env(state_dir, **settings),
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_joiner(cgroup),
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process)
            yield url
            assert process.poll() is None, "the agent died"
        finally:
            process.terminate()
            process.wait(timeout=20)
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]  # no client behaviour may print a traceback


def _joiner(cgroup: Path | None) -> Any:
    if cgroup is None:
        return None

    def join() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return join


def _wait_ready(url: str, process: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the agent exited at start"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/models/tiny/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError("the agent did not become ready")


def raw_exchange(url: str, request: bytes, wait_s: float = 5.0) -> bytes:
    """Send raw bytes, return whatever comes back until the server closes or ``wait_s`` passes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(request)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in request:
                    break
    return b"".join(chunks)


def post(url: str, path: str = "/v2/models/tiny/infer", **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=10, **kwargs)


# --- the table ------------------------------------------------------------------------------------


def test_64_simultaneous_connections_are_all_answered(device: dict[str, Any]) -> None:
    """Backlog 5 reset connections at concurrency 64; every one of them is answered now."""
    results: list[int] = []

    def one() -> None:
        with httpx.Client(timeout=30) as client:
            results.append(client.post(f"{device['url']}/v2/models/tiny/infer", content=GOOD).status_code)

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(200) == 64, results


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "99999999999999999999999"])
def test_a_malformed_content_length_is_a_400_not_a_500_or_a_hang(device: dict[str, Any], length: str) -> None:
    request = f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{GOOD}".encode()
    started = time.monotonic()
    answer = raw_exchange(device["url"], request)
    assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("partial", ["headers", "body"])
def test_a_half_sent_request_is_dropped_after_the_read_timeout_and_holds_no_worker(
    device: dict[str, Any], partial: str
) -> None:
    host, port = device["url"].removeprefix("http://").split(":")
    sockets = []
    for _ in range(8):  # more than the worker threads: none of them may be held
        sock = socket.create_connection((host, int(port)))
        head = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        sock.sendall(head if partial == "headers" else head + b"\r\n" + b'{"inputs": [')
        sockets.append(sock)
    assert post(device["url"], content=GOOD).status_code == 200  # served meanwhile
    time.sleep(3.5)  # read timeout 1 s, checked every second
    for sock in sockets:
        sock.settimeout(2)
        assert sock.recv(100) == b"", "the half-sent request was not dropped"
        sock.close()


def test_a_body_still_arriving_at_a_useful_rate_is_not_cut_off_by_the_read_timeout(device: dict[str, Any]) -> None:
    """Read timeout 1 s: a 60 KB body sent over ~2.5 s (24 KB/s, far above the 500 B/s minimum) is answered."""
    body = GOOD[:-1] + " " * 60_000 + "}"
    host, port = device["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        started = time.monotonic()
        for i in range(0, len(body), 6_000):
            sock.sendall(body[i : i + 6_000].encode())
            time.sleep(0.25)
        assert time.monotonic() - started > 2  # past the read timeout, still arriving
        assert sock.recv(100).startswith(b"HTTP/1.1 200"), "the connection was cut while the body arrived"


def test_clients_that_disconnect_early_leave_no_traceback(device: dict[str, Any]) -> None:
    host, port = device["url"].removeprefix("http://").split(":")
    body = GOOD.encode()
    for cut in (10, len(body) // 2):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body[:cut])  # fmt: skip
        sock.close()
    for _ in range(20):  # hang up before reading the answer
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body)  # fmt: skip
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    assert post(device["url"], content=GOOD).status_code == 200  # (the daemon's log is checked at teardown)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_are_accepted(device: dict[str, Any], encoding: str) -> None:
    body = gzip.compress(GOOD.encode()) if encoding == "gzip" else zlib.compress(GOOD.encode())
    answer = post(device["url"], content=body, headers={"Content-Encoding": encoding})
    assert answer.status_code == 200, answer.text


def test_a_gzip_bomb_is_refused_while_inflating(device: dict[str, Any]) -> None:
    bomb = gzip.compress(b"[" + b"0," * 20_000_000 + b"0]")  # 40 MB of JSON in ~40 KB
    started = time.monotonic()
    answer = post(device["url"], content=bomb, headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 413 and time.monotonic() - started < 2, answer.text


def test_an_unknown_model_is_a_404_and_never_reaches_the_cloud(device: dict[str, Any]) -> None:
    before = device["cloud"].requests
    answer = post(device["url"], "/v2/models/nosuch/infer", content=GOOD)
    assert answer.status_code == 404 and "nosuch" in answer.json()["error"]
    assert device["cloud"].requests == before
    assert httpx.get(f"{device['url']}/v2/models/nosuch/ready").status_code == 404


def test_the_version_in_the_path_is_honoured(device: dict[str, Any]) -> None:
    assert post(device["url"], "/v2/models/tiny/versions/1/infer", content=GOOD).json()["model_version"] == "1"
    before = device["cloud"].requests  # (earlier tests may have fallen back on a busy host: deadline 50 ms)
    answer = post(device["url"], "/v2/models/tiny/versions/999/infer", content=GOOD)
    assert answer.status_code == 404 and "999" in answer.json()["error"]
    assert device["cloud"].requests == before


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e39"])
def test_non_finite_inputs_are_refused(device: dict[str, Any], value: str) -> None:
    body = GOOD.replace("0.4", value)
    answer = post(device["url"], content=body)
    assert answer.status_code == 400 and "infinite" in answer.json()["error"], answer.text


def test_a_57_mb_json_body_is_refused_from_its_length_without_being_parsed(device: dict[str, Any]) -> None:
    numbers = b",".join([b"0.123456789"] * 5_200_000)  # ~57 MB of valid JSON
    body = b'{"inputs":[{"name":"x","shape":[1300000,4],"datatype":"FP32","data":[' + numbers + b"]}]}"
    started = time.monotonic()
    answer = post(device["url"], content=body)
    assert answer.status_code == 413 and time.monotonic() - started < 3, answer.text[:300]
    assert post(device["url"], content=GOOD).status_code == 200


def test_a_shape_the_model_cannot_take_is_refused_and_an_impossible_one_before_its_data_is_parsed(
    device: dict[str, Any],
) -> None:
    data = ",".join(["0.5"] * 65)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 65], "datatype": "FP32", "data": []}]})
    answer = post(device["url"], content=body.replace("[]", f"[{data}]"))
    assert answer.status_code == 400 and "does not match" in answer.json()["error"]
    huge = json.dumps({"inputs": [{"name": "x", "shape": [100000, 4], "datatype": "FP32", "data": []}]})
    padded = huge.replace("[]", "[" + ",".join(["0.5"] * 16_500) + "]")  # 66 KB: under the model's cap, pre-scanned
    answer = post(device["url"], content=padded)
    assert answer.status_code == 400 and "holds more elements" in answer.json()["error"]


# --- memory-limited ---------------------------------------------------------------------------------


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Path | None]:
    """A cgroup (v2 or v1) capped at ``limit_bytes``; None when this host does not let us create one."""
    for root, limit_file in ((Path("/sys/fs/cgroup"), "memory.max"),
                             (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):  # fmt: skip
        if not (root / limit_file).exists() and not (root / "cgroup.procs").exists():
            continue
        group = root / f"edgefleet-test-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
            (group / limit_file).write_text(str(limit_bytes))
        except OSError:
            with contextlib.suppress(OSError):
                group.rmdir()
            continue
        try:
            yield group
        finally:
            for _ in range(50):
                with contextlib.suppress(OSError):
                    group.rmdir()
                    break
                time.sleep(0.1)
        return
    yield None


def test_the_agent_survives_hostile_bodies_at_any_concurrency_in_a_memory_limited_cgroup(tmp_path: Path) -> None:
    """384 MiB for the whole agent; 20 clients at once send bodies that would take ~3 GiB to parse together.

    ``max_batch`` is raised so the model's schema does not refuse them from their length: only the
    memory budget (derived from the cgroup's limit) stands between these bodies and the OOM killer.
    """
    state_dir = tmp_path / "device"
    publish_bundle(tmp_path / "targets", tmp_path, "tiny", 1, unbounded_batch=True)
    from device_agent.agent import Agent

    agent = Agent.from_config(environ={}, state_dir=state_dir, min_free_disk_bytes=0, health_runs=2)
    agent.updater.set_source(DirectorySource(tmp_path / "targets", state_dir / "cache"))
    agent.updater.apply({"models": [entry("tiny", 1)]})
    agent.close()
    limit = 384 * 2**20
    with memory_cgroup(limit) as group:
        if group is None:
            pytest.skip("this host does not allow creating a memory cgroup (needs root and a cgroup filesystem)")
        with running_daemon(state_dir, cgroup=group, max_batch=10_000_000) as url:
            head = b'{"inputs":[{"name":"x","shape":[1000001,4],"datatype":"FP32","data":['
            medium = head + b"0.1," * 1_000_000 + b"0]}]}"  # 4 MB: ~100 MB parsed, a few fit at once
            large = head + b"0.1," * 10_000_000 + b"0]}]}"  # 40 MB: ~1 GB parsed, more than the budget
            statuses: list[int] = []

            def hostile(body: bytes) -> None:
                with contextlib.suppress(httpx.HTTPError):
                    statuses.append(httpx.post(f"{url}/v2/models/tiny/infer", content=body, timeout=60).status_code)

            threads = [threading.Thread(target=hostile, args=(medium if i % 5 else large,)) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert statuses and all(s in (400, 413, 503) for s in statuses), statuses
            assert post(url, content=GOOD).status_code == 200  # still serving
        oom = (group / "memory.oom_control").read_text() if (group / "memory.oom_control").exists() else ""
        events = (group / "memory.events").read_text() if (group / "memory.events").exists() else ""
        assert "oom_kill 0" in oom or "oom_kill 0" in events or not (oom or events), oom + events

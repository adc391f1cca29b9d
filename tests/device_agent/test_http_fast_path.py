"""The HTTP server's fast lane: a route measured fast runs on the I/O thread, anything that may wait does not."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.fastpath import FastPath, FastPathSettings
from device_agent.httpapi import AgentHttpServer, HttpSettings
from device_agent.inference import LocalEngine
from device_agent.serving import PredictResult, ServingConfig, ServingPipeline
from tests.device_agent.helpers import Device, entry
from tests.device_agent.telemetry.conftest import make_bundle

INFER = "/v2/models/tiny/infer"
IO_THREAD = "edgefleet-http"
# These tests are about routing, not timing: a loaded or emulated host (qemu) may take more than the 1 ms of
# CPU default for the tiny model's request, and preempt inline requests past the 2 ms default.
TOLERANT = HttpSettings(fast_path=FastPathSettings(fast_cpu_s=1.0, max_inline_wall_s=5.0, stall_wall_s=10.0))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(clock: Clock, room: list[bool] | None = None, **settings: Any) -> FastPath:
    has_room = (lambda: room[0]) if room is not None else (lambda: True)
    return FastPath(FastPathSettings(**settings), has_room, clock)


def warm(fast_path: FastPath, route: str, cpu_s: float, runs: int = 8) -> None:
    for _ in range(runs):
        fast_path.observe(route, cpu_s, cpu_s * 3, inline=False)


# --- the policy ---------------------------------------------------------------------------------------


def test_only_inference_posts_are_routes_of_the_fast_lane() -> None:
    assert FastPath.route("POST", "/v2/models/m/infer") == "/v2/models/m/infer"
    assert FastPath.route("POST", "/v2/models/m/versions/2/infer/") == "/v2/models/m/versions/2/infer"
    assert FastPath.route("GET", "/v2/models/m/infer") is None
    assert FastPath.route("POST", "/v1/chat/completions") is None
    assert FastPath.route("GET", "/v2/health/ready") is None


def test_a_route_runs_inline_once_its_requests_measured_fast_on_the_workers() -> None:
    fast_path = policy(Clock())
    assert not fast_path.fast(INFER, 100), "an unmeasured route starts on the workers"
    warm(fast_path, INFER, 0.0002, runs=7)
    assert not fast_path.fast(INFER, 100), "seven requests are not yet a measurement"
    warm(fast_path, INFER, 0.0002, runs=1)
    assert fast_path.fast(INFER, 100)


def test_a_route_whose_requests_cost_more_cpu_than_the_limit_stays_on_the_workers() -> None:
    fast_path = policy(Clock(), fast_cpu_s=0.001)
    warm(fast_path, INFER, 0.003, runs=50)
    assert not fast_path.fast(INFER, 100)


def test_a_large_body_a_full_engine_or_the_lane_switched_off_never_runs_inline() -> None:
    room = [True]
    fast_path = policy(Clock(), room, max_body_bytes=1000)
    warm(fast_path, INFER, 0.0001)
    assert fast_path.fast(INFER, 1000) and not fast_path.fast(INFER, 1001)
    room[0] = False
    assert not fast_path.fast(INFER, 100), "an inline request must never wait for admission"
    off = policy(Clock(), enabled=False)
    warm(off, INFER, 0.0001)
    assert not off.fast(INFER, 100)


def test_a_stalled_inline_request_sends_its_route_back_to_the_workers_for_the_cooldown() -> None:
    clock = Clock()
    fast_path = policy(clock, stall_wall_s=1.0, cooldown_s=60)
    warm(fast_path, INFER, 0.0001)
    fast_path.observe(INFER, 0.0001, 1.5, inline=True)  # little CPU, long wall: it waited on something
    assert not fast_path.fast(INFER, 100)
    clock.now += 59
    warm(fast_path, INFER, 0.0001)
    assert not fast_path.fast(INFER, 100), "still cooling down"
    clock.now += 2
    assert fast_path.fast(INFER, 100), "measured fast again after the cooldown"


def test_inline_requests_typically_slower_than_the_wall_limit_go_back_to_the_workers() -> None:
    fast_path = policy(Clock(), max_inline_wall_s=0.002, stall_wall_s=1.0)
    warm(fast_path, INFER, 0.0001)
    inline_runs = 0
    while fast_path.fast(INFER, 100) and inline_runs < 40:
        fast_path.observe(INFER, 0.0001, 0.004, inline=True)  # ORT threads computing while this one waits
        inline_runs += 1
    assert inline_runs == 4 and not fast_path.fast(INFER, 100)


def test_an_inline_request_preempted_now_and_then_does_not_send_its_route_back() -> None:
    """On a busy device another process may take the CPU in the middle of a request: that is not the route."""
    fast_path = policy(Clock(), max_inline_wall_s=0.002, stall_wall_s=1.0)
    warm(fast_path, INFER, 0.0001)
    for i in range(100):
        fast_path.observe(INFER, 0.0001, 0.3 if i % 3 == 0 else 0.0002, inline=True)
    assert fast_path.fast(INFER, 100)


def test_inline_requests_waiting_milliseconds_for_the_gil_keep_their_route_inline() -> None:
    """Right after a route moves inline, the workers still drain its queue and its first inline requests wait
    for the GIL (measured at concurrency 64: 2 to 4 ms of wall for 0.2 to 0.4 ms of CPU). That is not the
    route's doing, and the workers convoy on the GIL far worse: the defaults keep such a route inline."""
    fast_path = policy(Clock())
    warm(fast_path, INFER, 0.0002)
    for _ in range(100):
        fast_path.observe(INFER, 0.0003, 0.004, inline=True)
    assert fast_path.fast(INFER, 100)


def test_an_answer_from_the_fallback_chain_sends_its_route_back_to_the_workers() -> None:
    clock = Clock()
    fast_path = policy(clock, cooldown_s=60)
    warm(fast_path, INFER, 0.0001)
    fast_path.blocked(INFER)
    warm(fast_path, INFER, 0.0001)
    assert not fast_path.fast(INFER, 100)
    clock.now += 61
    assert fast_path.fast(INFER, 100)


# --- the real server ------------------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path, published: Path) -> Iterator[Agent]:
    device = Device.start(tmp_path / "device", published)
    assert device.updater.deploy(entry("tiny", 1)).status.value == "installed"
    device.engine.close()
    # The bundle's deadline is 50 ms: the pipeline runs the model inline (and the lane may take the route)
    # once its last 32 to 64 latencies' p99 is within it, not ten times within it (the default margin),
    # which one slow call on a loaded host would prevent for 64 calls.
    margin = {"EDGEFLEET_AGENT_SERVING__INLINE_DEADLINE_MARGIN": "1"}
    a = Agent.from_config(environ=margin, state_dir=tmp_path / "device")
    yield a
    a.close()


class ThreadRecorder:
    """Wraps an agent's predict, noting the thread each request ran on."""

    def __init__(self, agent: Any) -> None:
        self.agent, self.threads = agent, []
        self.predict_inner = agent.predict

    def __getattr__(self, name: str) -> Any:
        return getattr(self.agent, name)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return self.predict_inner(*args, **kwargs)


def infer_body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def test_a_fast_models_requests_move_to_the_io_thread_and_answer_the_same(agent: Agent) -> None:
    recorder = ThreadRecorder(agent)
    server = AgentHttpServer(recorder, "127.0.0.1", 0, settings=TOLERANT).start()
    try:
        x = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
        expected = agent.predict({"x": x}).outputs["class_index"].ravel().tolist()
        with httpx.Client(base_url=server.url) as client:
            # 32 answers let the serving pipeline run the model inline (its deadline, DeadlineGuard); until
            # then the model runs on the deadline thread, and the route is measured from there on
            answers = [client.post(INFER, json=infer_body(x)).json() for _ in range(60)]
    finally:
        server.stop()
    assert all({o["name"]: o for o in a["outputs"]}["class_index"]["data"] == expected for a in answers)
    assert recorder.threads[0].startswith("waitress-"), "measured on a worker first"
    assert IO_THREAD not in recorder.threads[:31], "not while the model runs on the deadline thread"
    assert recorder.threads[-10:] == [IO_THREAD] * 10, recorder.threads


def test_inline_answers_to_pipelined_requests_come_back_whole_in_order_then_the_connection_closes(
    agent: Agent,
) -> None:
    """A pipelined connection's requests are served inline one per loop pass: none may be lost, reordered
    or cut, and ``Connection: close`` still closes the connection once they are sent."""
    recorder = ThreadRecorder(agent)
    server = AgentHttpServer(recorder, "127.0.0.1", 0, settings=TOLERANT).start()
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(1, 4)).astype(np.float32) for _ in range(6)]
    expected = [agent.predict({"x": x}).outputs["class_index"].ravel().tolist() for x in xs]
    try:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(50):  # until the route runs inline
                client.post(INFER, json=infer_body(xs[0]))
        bodies = [json.dumps(infer_body(x)).encode() for x in xs]
        wire = b"".join(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(b)}\r\n".encode()
            + (b"Connection: close\r\n" if i == len(bodies) - 1 else b"") + b"\r\n" + b
            for i, b in enumerate(bodies)
        )  # fmt: skip
        recorder.threads.clear()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(wire)
            received = b""
            while chunk := sock.recv(65536):  # ends when the server closes the connection
                received += chunk
    finally:
        server.stop()
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert head.startswith(b"HTTP/1.1 200"), head
        answers.append(json.loads(rest[:length]))
        received = rest[length:]
    assert [{o["name"]: o for o in a["outputs"]}["class_index"]["data"] for a in answers] == expected
    assert recorder.threads == [IO_THREAD] * len(xs), recorder.threads


class HeldLoop:
    """Holds the server's I/O thread before it serves its next pass of requests, until :meth:`release`: what
    is sent meanwhile waits in the sockets, and the next pass reads it all (one pass, several requests)."""

    def __init__(self, server: AgentHttpServer) -> None:
        self.held, self.released = threading.Event(), threading.Event()
        dispatcher = server.dispatcher
        run_pending = dispatcher.run_pending

        def gated() -> None:
            if dispatcher.has_pending and not self.released.is_set():
                self.held.set()
                self.released.wait(10)
            run_pending()

        dispatcher.run_pending = gated  # type: ignore[method-assign]

    def release(self) -> None:
        self.released.set()


def burst(server: AgentHttpServer, bodies: list[bytes], path: str = INFER) -> tuple[list[tuple[int, Any]], list[int]]:
    """Send each body on its own connection while the I/O thread is held (behind an opening request of the
    route), so that one loop pass reads them all; the answers (status, JSON) in the bodies' order, each whole
    and its connection closed after it, and the number of requests each ``prepare_together`` call took."""
    prepared: list[int] = []
    prepare = server.dispatcher.prepare
    assert prepare is not None
    server.dispatcher.prepare = lambda environs: (prepared.append(len(environs)), prepare(environs))[1]
    held = HeldLoop(server)
    host, port = server.url.removeprefix("http://").split(":")
    opening = json.dumps(infer_body(np.zeros((1, 4), np.float32))).encode()
    sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(len(bodies) + 1)]
    accepted(server, sockets)  # waitress accepts one connection per loop pass: none may be left for later
    try:
        for i, (sock, body) in enumerate(zip(sockets, [opening, *bodies], strict=True)):
            sock.sendall(f"POST {INFER if i == 0 else path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)  # fmt: skip
            if i == 0:
                assert held.held.wait(10), "the opening request never reached the fast lane"
    finally:
        held.release()
    answers = []
    for sock in sockets:
        with sock:
            received = b""
            while chunk := sock.recv(65536):  # ends when the server closes the connection
                received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert len(rest) == length, "one whole answer, then the connection closed"
        answers.append((int(head.split(b" ")[1]), json.loads(rest)))
    return answers[1:], prepared


def accepted(server: AgentHttpServer, sockets: list[socket.socket]) -> None:
    """Wait until the server has accepted every one of ``sockets`` (each has its channel)."""
    ports = {sock.getsockname()[1] for sock in sockets}
    deadline = time.monotonic() + 10
    while not ports <= {channel.addr[1] for channel in list(server.server.active_channels.values())}:
        assert time.monotonic() < deadline, "the server did not accept the connections"
        time.sleep(0.001)


def warm_inline(server: AgentHttpServer, x: np.ndarray) -> None:
    with httpx.Client(base_url=server.url) as client:
        for _ in range(50):  # the pipeline runs the model inline after 32 answers (its deadline), the lane 8 later
            assert client.post(INFER, json=infer_body(x)).status_code == 200


class TogetherRecorder(ThreadRecorder):
    """Also notes how many requests each ``predict_together`` call took."""

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.together: list[int] = []

    def predict_together(self, batch: Any, **kwargs: Any) -> Any:
        self.together.append(len(batch))
        return self.agent.predict_together(batch, **kwargs)


def test_requests_read_in_one_loop_pass_are_answered_by_one_model_call_each_its_own_answer(agent: Agent) -> None:
    """Their answers are computed together and sent together at the pass's end: each connection gets its own
    answer, whole, and ``Connection: close`` closes each after it (``burst`` checks both)."""
    recorder = TogetherRecorder(agent)
    server = AgentHttpServer(recorder, "127.0.0.1", 0, settings=TOLERANT).start()
    rng = np.random.default_rng(8)
    xs = [rng.normal(size=(1, 4)).astype(np.float32) for _ in range(8)]
    expected = [agent.predict({"x": x}).outputs for x in xs]
    try:
        warm_inline(server, xs[0])
        answers, prepared = burst(server, [json.dumps(infer_body(x)).encode() for x in xs])
    finally:
        server.stop()
    assert [status for status, _ in answers] == [200] * len(xs)
    for (_, answer), want in zip(answers, expected, strict=True):
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert outputs["class_index"]["data"] == want["class_index"].ravel().tolist()
        np.testing.assert_allclose(outputs["probabilities"]["data"], want["probabilities"].ravel(), rtol=1e-5)
        assert answer["parameters"]["source"] == "local"
    assert prepared == [len(xs)] and recorder.together == [len(xs)], "one pass, one model call for all"


def test_a_bad_request_among_requests_answered_together_gets_its_own_error_and_the_others_their_answers(
    agent: Agent,
) -> None:
    server = AgentHttpServer(agent, "127.0.0.1", 0, settings=TOLERANT).start()
    x = np.zeros((1, 4), np.float32)
    good = json.dumps(infer_body(x)).encode()
    wrong_width = json.dumps(infer_body(np.zeros((1, 5), np.float32))).encode()
    not_finite = good.replace(b"0.0", b"NaN", 1)
    unhashable = good.replace(b'"FP32"', b'["FP32"]')  # was a 500: a list is no key of the datatype table
    try:
        warm_inline(server, x)
        answers, _ = burst(server, [good, b"{not json", good, wrong_width, not_finite, good, unhashable])
    finally:
        server.stop()
    statuses = [status for status, _ in answers]
    assert statuses == [200, 400, 200, 400, 400, 200, 400], answers
    assert "not valid JSON" in answers[1][1]["error"] and "NaN" in answers[4][1]["error"]
    assert "x" in answers[3][1]["error"] and "datatype ['FP32']" in answers[6][1]["error"]


def test_a_prepare_call_that_fails_leaves_each_request_to_be_answered_alone_from_its_body(agent: Agent) -> None:
    """A bug in answering together must not cost the requests of the pass: each is read again and answered."""
    server = AgentHttpServer(agent, "127.0.0.1", 0, settings=TOLERANT).start()
    rng = np.random.default_rng(9)
    xs = [rng.normal(size=(1, 4)).astype(np.float32) for _ in range(6)]
    expected = [agent.predict({"x": x}).outputs["class_index"].ravel().tolist() for x in xs]

    def broken(environs: list[dict[str, Any]]) -> None:
        for environ in environs:
            environ["wsgi.input"].read()  # what a prepare call does first
        raise RuntimeError("a bug in prepare_together")

    try:
        warm_inline(server, xs[0])
        server.dispatcher.prepare = broken
        answers, _ = burst(server, [json.dumps(infer_body(x)).encode() for x in xs])
    finally:
        server.stop()
    assert [status for status, _ in answers] == [200] * len(xs)
    assert [{o["name"]: o for o in a["outputs"]}["class_index"]["data"] for _, a in answers] == expected


def test_a_request_whose_environ_cannot_be_built_ahead_leaves_the_pass_to_be_answered_alone(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error while building the pass's environs must not stop the I/O thread (nothing would answer)."""
    from device_agent import fastpath

    server = AgentHttpServer(agent, "127.0.0.1", 0, settings=TOLERANT).start()
    built = fastpath.prepared_environ
    calls = [0]

    def second_fails(channel: Any) -> dict[str, Any]:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("an environ that cannot be built")
        return built(channel)

    x = np.zeros((1, 4), np.float32)
    try:
        warm_inline(server, x)
        monkeypatch.setattr(fastpath, "prepared_environ", second_fails)
        answers, prepared = burst(server, [json.dumps(infer_body(x)).encode()] * 4)
        monkeypatch.undo()
        with httpx.Client(base_url=server.url) as client:
            assert client.post(INFER, json=infer_body(x)).status_code == 200, "the server still answers"
    finally:
        server.stop()
    assert [status for status, _ in answers] == [200] * 4 and prepared == [] and calls[0] == 2


def test_requests_for_a_version_the_device_does_not_serve_are_refused_together_with_404(agent: Agent) -> None:
    server = AgentHttpServer(agent, "127.0.0.1", 0, settings=TOLERANT).start()
    x = np.zeros((1, 4), np.float32)
    path = "/v2/models/tiny/versions/9/infer"
    try:
        warm_inline(server, x)
        with httpx.Client(base_url=server.url) as client:
            for _ in range(10):  # the 404 route is measured fast too
                assert client.post(path, json=infer_body(x)).status_code == 404
        answers, prepared = burst(server, [json.dumps(infer_body(x)).encode()] * 4, path)
    finally:
        server.stop()
    assert [status for status, _ in answers] == [404] * 4 and prepared == [4]
    assert all("version 9 is not on this device" in answer["error"] for _, answer in answers)


class StandIn:
    """An agent whose answers say they came from the fallback chain (a cloud call may wait on the network)."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def predict(self, inputs: dict[str, np.ndarray], model: str, **_: Any) -> PredictResult:
        self.threads.append(threading.current_thread().name)
        outputs = {"y": np.zeros((1,), np.float32)}
        return PredictResult(outputs, "cloud", model, 1, 0.1, fallback_reason="low_confidence")


def test_a_route_answered_by_the_fallback_chain_stays_on_worker_threads() -> None:
    stand_in = StandIn()
    server = AgentHttpServer(stand_in, "127.0.0.1", 0, settings=TOLERANT).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(30):
                answer = client.post(INFER, json=infer_body(np.zeros((1, 4), np.float32))).json()
                assert answer["parameters"]["fallback_reason"] == "low_confidence"
    finally:
        server.stop()
    assert IO_THREAD not in stand_in.threads


def test_a_route_that_waits_without_using_cpu_goes_back_to_the_workers_after_one_inline_stall() -> None:
    """A request that sleeps costs no CPU, so its route looks fast; its first inline runs show the wait."""
    threads: list[str] = []

    def sleepy_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        threads.append(threading.current_thread().name)
        time.sleep(0.08)
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
        return [b"{}"]

    slow_allowed = HttpSettings(fast_path=FastPathSettings(fast_cpu_s=1.0))  # the sleep is 80 ms of wall, little CPU
    server = AgentHttpServer(StandIn(), "127.0.0.1", 0, settings=slow_allowed, app=sleepy_app).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(20):
                assert client.post(INFER, content=b"{}").status_code == 200
    finally:
        server.stop()
    assert IO_THREAD not in threads[:8], "measured on the workers first"
    assert threads[8:12] == [IO_THREAD] * 4, "four inline requests show the route's typical wall time"
    assert IO_THREAD not in threads[12:], threads


class DeadlineBound:
    """An agent whose real serving pipeline computes every answer on its deadline thread (inline runs off)."""

    def __init__(self, root: Path) -> None:
        make_bundle(root, 1, seed=1)  # a real tiny ONNX classifier, deadline 10 s
        engine = LocalEngine()
        engine.load("tiny", root, "onnx-fp32")
        self.pipeline = ServingPipeline(engine, ServingConfig(inline_deadline_margin=0.0))
        self.threads: list[str] = []

    def predict(self, inputs: dict[str, np.ndarray], model: str, **_: Any) -> PredictResult:
        self.threads.append(threading.current_thread().name)
        return self.pipeline.predict(model, inputs)


def test_a_route_whose_answers_wait_on_the_deadline_thread_stays_on_worker_threads(tmp_path: Path) -> None:
    """Its requests cost the waiting thread little CPU, so they look fast; inline, a hung model would stop
    every connection until the deadline (10 s here)."""
    agent = DeadlineBound(tmp_path / "bundle")
    server = AgentHttpServer(agent, "127.0.0.1", 0, settings=TOLERANT).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(30):
                answer = client.post(INFER, json=infer_body(np.zeros((1, 4), np.float32))).json()
                assert answer["parameters"]["source"] == "local"
    finally:
        server.stop()
        agent.pipeline.close()
    assert len(agent.threads) == 30 and IO_THREAD not in agent.threads, agent.threads


def test_fast_requests_are_answered_while_a_slow_one_holds_a_worker(agent: Agent) -> None:
    """The I/O thread keeps serving the fast lane while a worker is busy with something long."""
    release = threading.Event()

    class Mixed(ThreadRecorder):
        def predict(self, inputs: dict[str, np.ndarray], model: str | None = None, **kw: Any) -> Any:
            if float(inputs["x"][0, 0]) == 99.0:
                release.wait(10)
            return super().predict(inputs, model=model, **kw)

    recorder = Mixed(agent)
    server = AgentHttpServer(recorder, "127.0.0.1", 0, settings=TOLERANT).start()
    x = np.zeros((1, 4), np.float32)
    try:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(40):  # the model's deadline lets it run inline after 32 answers, the lane 8 later
                client.post(INFER, json=infer_body(x))
            slow_body = infer_body(np.full((1, 4), 99.0, np.float32))
            slow = threading.Thread(target=httpx.post, args=(server.url + "/v2/models/tiny/versions/1/infer",),
                                    kwargs={"json": slow_body, "timeout": 20})  # fmt: skip
            slow.start()
            began = time.perf_counter()
            for _ in range(20):
                assert client.post(INFER, json=infer_body(x)).status_code == 200
            fast_s = time.perf_counter() - began
            release.set()
            slow.join()
    finally:
        release.set()
        server.stop()
    assert fast_s < 5, f"20 fast requests took {fast_s:.1f} s beside a slow one"
    assert recorder.threads.count(IO_THREAD) >= 20

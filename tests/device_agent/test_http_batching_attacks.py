"""Dynamic batching attacked: requests the fast lane answers together, each checked against its answer alone.

Every request answered together must get what it gets when it comes alone (status, error, outputs up to the
last bits of a larger batch), be counted once, and leave the memory budget as it found it. :class:`Gate` holds
the server's loop between two passes while the requests are written, so that one pass reads them all: which
requests are answered together is then decided by the test, not by the host's scheduling.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bundles import oip
from device_agent.agent import Agent
from device_agent.httpapi import AgentHttpServer
from tests.device_agent.test_http_fast_path import INFER, TOLERANT, agent, infer_body, warm_inline

__all__ = ["agent"]  # the fixture

WAIT_S = 10.0


class Gate:
    """Holds the server's I/O thread at the end of a loop pass (in ``run_pending``, before it serves anything)
    until :meth:`open`; notes the size of every ``prepare_together`` call."""

    def __init__(self, server: AgentHttpServer) -> None:
        self.server, self.dispatcher = server, server.dispatcher
        self.armed, self.held, self.released = False, threading.Event(), threading.Event()
        self.prepared: list[int] = []
        run_pending, prepare = self.dispatcher.run_pending, self.dispatcher.prepare
        assert prepare is not None

        def gated_run_pending() -> None:
            if self.armed and not self.dispatcher.has_pending:
                self.armed = False
                self.held.set()
                self.released.wait(WAIT_S)
            run_pending()

        def counted_prepare(environs: list[dict[str, Any]]) -> None:
            self.prepared.append(len(environs))
            prepare(environs)

        self.dispatcher.run_pending = gated_run_pending  # type: ignore[method-assign]
        self.dispatcher.prepare = counted_prepare

    def hold(self) -> None:
        """Stop the loop between two passes (none pending): what is sent meanwhile is read by the next pass."""
        self.held.clear()
        self.released.clear()
        self.armed = True
        assert self.held.wait(WAIT_S), "the server's loop did not come round"

    def open(self) -> None:
        self.released.set()


def http_request(body: bytes, path: str = INFER, headers: dict[str, str] | None = None, close: bool = True) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def connect(server: AgentHttpServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=WAIT_S)


def accepted(server: AgentHttpServer, count: int) -> None:
    """Wait until the server's loop accepted ``count`` connections (a condition, polled)."""
    for _ in range(int(WAIT_S / 0.005)):
        if len(server.server.active_channels) >= count:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"{len(server.server.active_channels)} connections accepted, not {count}")


def read_all(sock: socket.socket) -> bytes:
    received = b""
    with sock:
        while chunk := sock.recv(65536):  # ends when the server closes the connection
            received += chunk
    return received


class Reply:
    """One HTTP answer: its status, headers (lower-case names) and body."""

    def __init__(self, raw: bytes) -> None:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(self.headers["content-length"])
        self.body, self.rest = rest[:length], rest[length:]

    def json(self) -> Any:
        header_length = self.headers.get("inference-header-content-length")
        return json.loads(self.body if header_length is None else self.body[: int(header_length)])

    def outputs(self) -> dict[str, np.ndarray]:
        header_length = self.headers.get("inference-header-content-length")
        header, payload = oip.split_body(self.body, header_length)
        return oip.decode_answer(json.loads(header), payload)

    def comparable(self) -> tuple[int, dict[str, str], Any]:
        """What must not differ from the request's answer alone (all but the outputs' numbers and the latency)."""
        answer = self.json()
        if isinstance(answer, dict):
            answer.get("parameters", {}).pop("latency_ms", None)
            for tensor in answer.get("outputs", []):
                tensor.pop("data", None)
        headers = {k: v for k, v in self.headers.items() if k not in ("date", "content-length", "connection")}
        headers.pop("inference-header-content-length", None)
        return self.status, headers, answer


def together(server: AgentHttpServer, gate: Gate, requests: list[bytes]) -> list[Reply]:
    """Each request on its own connection, all read by one loop pass; their answers in order."""
    sockets = [connect(server) for _ in requests]
    try:
        accepted(server, len(sockets))
        gate.hold()
        for sock, request in zip(sockets, requests, strict=True):
            sock.sendall(request)
    finally:
        gate.open()
    return [Reply(read_all(sock)) for sock in sockets]


def alone(server: AgentHttpServer, request: bytes) -> Reply:
    sock = connect(server)
    sock.sendall(request)
    return Reply(read_all(sock))


def assert_same_answers(got: list[Reply], expected: list[Reply]) -> None:
    for index, (one, want) in enumerate(zip(got, expected, strict=True)):
        assert one.comparable() == want.comparable(), f"request {index}"
        if one.status == 200:
            mine, theirs = one.outputs(), want.outputs()
            assert list(mine) == list(theirs), f"request {index}"
            for name, value in mine.items():
                assert value.dtype == theirs[name].dtype and value.shape == theirs[name].shape, (index, name)
                if value.dtype.kind == "f":
                    np.testing.assert_allclose(value, theirs[name], rtol=1e-5, err_msg=f"request {index} {name}")
                else:
                    np.testing.assert_array_equal(value, theirs[name], err_msg=f"request {index} {name}")


@pytest.fixture
def served(agent: Agent) -> Iterator[tuple[AgentHttpServer, Gate]]:
    server = AgentHttpServer(agent, "127.0.0.1", 0, settings=TOLERANT).start()
    try:
        warm_inline(server, np.zeros((1, 4), np.float32))
        yield server, Gate(server)
    finally:
        server.stop()


def x_body(x: np.ndarray, **extra: Any) -> bytes:
    return json.dumps({**infer_body(x), **extra}).encode()


def binary_request(x: np.ndarray, path: str = INFER, **header_extra: Any) -> bytes:
    raw = x.astype("<f4").tobytes()
    spec = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [spec], **header_extra}).encode()
    return http_request(header + raw, path, {"Inference-Header-Content-Length": str(len(header))})


ROWS = np.random.default_rng(21).normal(size=(16, 4)).astype(np.float32)


def row(i: int) -> np.ndarray:
    return ROWS[i : i + 1]


# --- the attacks -------------------------------------------------------------------------------------------


def test_a_mix_of_encodings_forms_and_options_answered_together_gets_the_answers_it_gets_alone(
    served: tuple[AgentHttpServer, Gate],
) -> None:
    server, gate = served
    requests = [
        http_request(x_body(row(0))),
        http_request(gzip.compress(x_body(row(1))), headers={"Content-Encoding": "gzip"}),
        http_request(zlib.compress(x_body(row(2))), headers={"Content-Encoding": "deflate"}),
        binary_request(row(3)),
        binary_request(row(4), parameters={"binary_data_output": True}),
        http_request(x_body(row(5), id="req-5")),
        http_request(x_body(row(6), outputs=[{"name": "logits"}, {"name": "label"}])),
        http_request(x_body(row(7), outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}])),
        http_request(
            json.dumps(
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": row(8).tolist()}]}
            ).encode()
        ),  # fmt: skip
        http_request(
            json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
        ),  # fmt: skip
        http_request(x_body(ROWS[9:12])),  # three rows
        http_request(x_body(row(12), outputs=[{"name": "nope"}])),
        http_request(x_body(row(13), parameters={"binary_data_output": "yes"})),
        http_request(x_body(row(14)), "/v2/models/tiny/versions/1/infer"),
    ]
    got = together(server, gate, requests)
    assert max(gate.prepared) >= 10, gate.prepared
    assert_same_answers(got, [alone(server, r) for r in requests])
    assert server.app.budget.reserved_bytes == 0


def test_a_request_of_zero_rows_answered_together_gets_the_answer_it_gets_alone(
    served: tuple[AgentHttpServer, Gate],
) -> None:
    server, gate = served
    requests = [http_request(x_body(row(0))), tensor_request(x_spec([], [0, 4])), http_request(x_body(row(1)))]
    got = together(server, gate, requests)
    assert max(gate.prepared) == 3, gate.prepared
    assert_same_answers(got, [alone(server, r) for r in requests])


def test_requests_whose_parse_costs_together_exceed_the_memory_budget_each_get_their_answer_alone(
    agent: Agent,
) -> None:
    body = x_body(row(0))
    one = len(body) * 25  # a JSON body's parse cost (admission.parse_cost_bytes)
    settings = dataclasses.replace(TOLERANT, memory_budget_bytes=one * 2, queue_timeout_s=0.2)
    server = AgentHttpServer(agent, "127.0.0.1", 0, settings=settings).start()
    try:
        warm_inline(server, np.zeros((1, 4), np.float32))
        gate = Gate(server)
        requests = [http_request(x_body(row(i))) for i in range(5)]
        got = together(server, gate, requests)
        assert max(gate.prepared) == 5, gate.prepared
        assert_same_answers(got, [alone(server, r) for r in requests])
        assert server.app.budget.reserved_bytes == 0
    finally:
        server.stop()


def tensor_request(*specs: dict[str, Any], **extra: Any) -> bytes:
    return http_request(json.dumps({"inputs": list(specs), **extra}).encode())


def x_spec(data: Any, shape: list[int] | None = None, datatype: str = "FP32", name: str = "x") -> dict[str, Any]:
    return {"name": name, "shape": [1, 4] if shape is None else shape, "datatype": datatype, "data": data}


def test_bad_requests_among_good_ones_answered_together_get_the_errors_they_get_alone(
    served: tuple[AgentHttpServer, Gate],
) -> None:
    server, gate = served
    huge_shape = json.dumps({"inputs": [x_spec([0.0] * 4, [10**6, 4])], "pad": "x" * 70_000}).encode()
    requests = [
        http_request(x_body(row(0))),
        http_request(b""),  # no body at all
        http_request(gzip.compress(b" " * 200_000 + x_body(row(1))), headers={"Content-Encoding": "gzip"}),  # 413
        http_request(b"\x1f\x8b not gzip", headers={"Content-Encoding": "gzip"}),
        http_request(x_body(row(2)), headers={"Content-Encoding": "br"}),  # 415
        http_request(gzip.compress(huge_shape), headers={"Content-Encoding": "gzip"}),  # the prescan's 400
        tensor_request(x_spec([float("nan"), 1.0, 2.0, 3.0])),
        tensor_request(x_spec([1e39, 1.0, 2.0, 3.0])),  # too large for FP32
        tensor_request(x_spec(row(3).tolist())),  # nested
        tensor_request(x_spec(row(4).ravel().tolist(), datatype="FP64")),
        tensor_request(x_spec([1, 2, 3, 4], datatype="INT32")),
        tensor_request(x_spec([1.5, 2, 3, 4], datatype="INT32")),  # not an integer
        tensor_request(x_spec([], [1, 4])),
        tensor_request(x_spec([0.0] * 4), x_spec([0.0] * 4, name="y")),  # an input the model does not take
        tensor_request(x_spec([0.0] * 4), x_spec([1.0] * 4)),  # x twice
        tensor_request(x_spec([0.0] * 4, [2, 2])),
        tensor_request(x_spec([0.0] * 4, [4])),
        tensor_request(x_spec([0.0] * 8, [1, 4])),
        tensor_request(x_spec(["a", "b", "c", "d"], datatype="BYTES")),
        tensor_request(x_spec([0.0] * 4, [1, 4], name="")),
        http_request(b"[]"),
        http_request(x_body(row(5)), headers={"Inference-Header-Content-Length": "many"}),
        http_request(x_body(row(6)), headers={"Inference-Header-Content-Length": "9999"}),
        binary_request(row(7))[:-4] + b"\x00\x00\x00\x00\x00\x00\x00\x00",  # 4 bytes more than declared
        http_request(x_body(row(8))),
    ]
    got = together(server, gate, requests)
    assert max(gate.prepared) >= 20, gate.prepared
    expected = [alone(server, r) for r in requests]
    assert_same_answers(got, expected)
    assert [r.status for r in got][:2] == [200, 400] and got[-1].status == 200
    assert server.app.budget.reserved_bytes == 0


def counted_requests(agent: Agent) -> int:
    """The requests the agent's telemetry counted so far (its open windows closed, its buffer drained)."""
    recorder = agent.pipeline.recorder
    assert recorder is not None
    recorder.flush()
    counted = 0
    while (batch := recorder.buffer.next_batch(max_items=1000, max_bytes=10_000_000)) is not None:
        counted += sum(w.get("counters", {}).get("requests", 0) for w in batch.windows)
        recorder.buffer.ack(batch.batch_id)
    return counted


def test_each_request_answered_together_is_counted_once_by_telemetry(
    agent: Agent, served: tuple[AgentHttpServer, Gate]
) -> None:
    server, gate = served
    counted_requests(agent)
    requests = [http_request(x_body(row(i))) for i in range(6)]
    requests += [http_request(x_body(row(6), id="a")), binary_request(row(7)), http_request(x_body(ROWS[8:11]))]
    requests += [http_request(b"{not json")]  # refused before the model: not a model request
    got = together(server, gate, requests)
    assert max(gate.prepared) == len(requests), gate.prepared
    assert [r.status for r in got] == [200] * 9 + [400]
    assert counted_requests(agent) == 9


def test_clients_that_leave_after_sending_cost_neither_the_answers_of_the_others_nor_the_server(
    served: tuple[AgentHttpServer, Gate],
) -> None:
    """Two clients of a pass leave once their request is sent (one closing, one resetting the connection):
    each of the others gets its own answer, and the server keeps nothing of them."""
    server, gate = served
    stays = [http_request(x_body(row(i))) for i in range(4)]
    leaves = [http_request(x_body(row(i))) for i in range(4, 6)]
    sockets = [connect(server) for _ in range(6)]
    accepted(server, 6)
    try:
        gate.hold()
        for sock, request in zip(sockets, stays + leaves, strict=True):
            sock.sendall(request)
        sockets[4].close()
        sockets[5].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sockets[5].close()  # a reset
    finally:
        gate.open()
    got = [Reply(read_all(sock)) for sock in sockets[:4]]
    assert max(gate.prepared) >= 4, gate.prepared
    assert_same_answers(got, [alone(server, r) for r in stays])
    assert server.app.budget.reserved_bytes == 0
    for _ in range(int(WAIT_S / 0.005)):  # the left connections are closed (a condition, polled)
        if not server.server.active_channels:
            break
        threading.Event().wait(0.005)
    assert not server.server.active_channels


def test_pipelined_requests_among_a_pass_answered_together_each_get_their_answer_in_order(
    served: tuple[AgentHttpServer, Gate],
) -> None:
    """A connection's pipelined requests are served one per pass: the first with the pass's others, the next
    ones in later passes; each answer reaches its request, in order."""
    server, gate = served
    bodies = [x_body(row(i)) for i in range(8)]
    pipelined = [http_request(body, close=False) for body in bodies[:3]] + [http_request(bodies[3])]
    singles = [http_request(body) for body in bodies[4:]]
    sockets = [connect(server) for _ in range(1 + len(singles))]
    accepted(server, len(sockets))
    try:
        gate.hold()
        sockets[0].sendall(b"".join(pipelined))
        for sock, request in zip(sockets[1:], singles, strict=True):
            sock.sendall(request)
    finally:
        gate.open()
    received = read_all(sockets[0])
    got = []
    while received:
        got.append(Reply(received))
        received = got[-1].rest
    got += [Reply(read_all(sock)) for sock in sockets[1:]]
    assert max(gate.prepared) >= 5, gate.prepared
    assert_same_answers(got, [alone(server, http_request(body)) for body in bodies])


def test_answers_computed_together_are_sent_by_the_workers_when_the_engine_fills_up_meanwhile(
    served: tuple[AgentHttpServer, Gate],
) -> None:
    """Once a pass's answers are computed, a request whose turn comes when the engine has no free slot is
    handed to a worker (the I/O thread never waits for admission): the worker sends the answer computed."""
    server, gate = served
    full = threading.Event()
    has_room = server.fast_path.has_room
    server.fast_path.has_room = lambda: not full.is_set() and has_room()  # type: ignore[method-assign]
    prepare = server.dispatcher.prepare
    assert prepare is not None

    def prepare_then_fill(environs: list[dict[str, Any]]) -> None:
        prepare(environs)
        full.set()  # as if other requests took every slot meanwhile

    server.dispatcher.prepare = prepare_then_fill
    requests = [http_request(x_body(row(i))) for i in range(3)] + [http_request(b"{not json")]
    requests += [http_request(x_body(row(3), id="seven", outputs=[{"name": "label"}]))]
    got = together(server, gate, requests)
    full.clear()
    assert max(gate.prepared) == len(requests), gate.prepared
    assert_same_answers(got, [alone(server, r) for r in requests])
    assert server.app.budget.reserved_bytes == 0

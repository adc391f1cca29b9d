"""Whatever a client gets wrong is a 4xx with one readable ``error`` sentence, never a 500."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
import numpy as np
import pytest

from tests.fleet_server.inference.conftest import Served

X = np.zeros((1, 4), dtype=np.float32)


def _json(**header: Any) -> bytes:
    return json.dumps(header).encode()


def _binary(header: dict[str, Any], payload: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + payload, {"Inference-Header-Content-Length": str(len(head))}


GOOD_INPUT = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 1.0, 2.0, 3.0]}
BIN_INPUT = {"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
MALFORMED: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("wrong shape", "tiny", _json(inputs=[{**GOOD_INPUT, "shape": [1, 5], "data": [0.0] * 5}]), {}, 400, "shape"),
    ("shape that does not fit the data", "tiny", _json(inputs=[{**GOOD_INPUT, "shape": [2, 4]}]), {}, 400, "shape"),
    ("wrong datatype", "tiny", _json(inputs=[{**GOOD_INPUT, "datatype": "INT64", "data": [0, 1, 2, 3]}]), {}, 400,
     "datatype INT64"),
    ("unknown datatype", "tiny", _json(inputs=[{**GOOD_INPUT, "datatype": "FP8"}]), {}, 400, "not one of"),
    ("strings as numbers", "tiny", _json(inputs=[{**GOOD_INPUT, "data": ["a", "b", "c", "d"]}]), {}, 400, "data"),
    ("missing input", "tiny", _json(inputs=[{**GOOD_INPUT, "name": "y"}]), {}, 400, "no input"),
    ("no inputs", "tiny", _json(inputs=[]), {}, 400, "non-empty 'inputs'"),
    ("NaN where the schema does not allow it", "tiny",
     b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[NaN,1,2,3]}]}', {}, 400, "NaN or infinite"),
    ("number too large for FP32", "tiny", _json(inputs=[{**GOOD_INPUT, "data": [1e300, 0, 0, 0]}]), {}, 400,
     "infinite"),
    ("invalid JSON", "tiny", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("JSON that is not an object", "tiny", b"[1, 2]", {}, 400, "JSON object"),
    ("unknown output", "tiny", _json(inputs=[GOOD_INPUT], outputs=[{"name": "nope"}]), {}, 400, "no output"),
    ("truncated binary body", "tiny", *_binary({"inputs": [BIN_INPUT]}, X.tobytes()[:10]), 400, "shorter"),
    ("binary bytes nobody claims", "tiny", *_binary({"inputs": [BIN_INPUT]}, X.tobytes() + b"xx"), 400, "claims"),
    ("header length past the body", "tiny", b"{}", {"Inference-Header-Content-Length": "99"}, 400, "does not fit"),
    ("header length not a number", "tiny", b"{}", {"Inference-Header-Content-Length": "ten"}, 400, "integer"),
    ("corrupt gzip", "tiny", b"not gzip at all", {"Content-Encoding": "gzip"}, 400, "corrupt"),
    ("unknown encoding", "tiny", _json(inputs=[GOOD_INPUT]), {"Content-Encoding": "br"}, 415, "not supported"),
    ("unknown model", "nosuch", _json(inputs=[GOOD_INPUT]), {}, 404, "not published"),
    ("bad deadline", "tiny", _json(inputs=[GOOD_INPUT]), {"Inference-Deadline-Ms": "soon"}, 400, "milliseconds"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "model", "body", "extra", "status", "says"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_a_4xx_with_a_message(
    endpoint: Served, case: str, model: str, body: bytes, extra: dict[str, str], status: int, says: str
) -> None:
    headers = {"Authorization": f"Bearer {endpoint.fleet.admin_key}", **extra}
    response = httpx.post(f"{endpoint.url}/v2/models/{model}/infer", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]


def test_unknown_version_is_a_404_naming_the_published_ones(endpoint: Served) -> None:
    headers = {"Authorization": f"Bearer {endpoint.fleet.admin_key}"}
    response = httpx.post(f"{endpoint.url}/v2/models/tiny/versions/9/infer", content=_json(inputs=[GOOD_INPUT]),
                          headers=headers, timeout=30)  # fmt: skip
    assert response.status_code == 404
    assert "published: 2, 1" in response.json()["error"]


def test_a_body_over_the_limit_is_refused_before_and_after_inflating(make_endpoint: Any) -> None:
    with make_endpoint(max_body_bytes=4096) as served:
        headers = {"Authorization": f"Bearer {served.fleet.admin_key}"}
        big = _json(inputs=[{**GOOD_INPUT, "data": [0.0] * 5000}])
        response = httpx.post(f"{served.url}/v2/models/tiny/infer", content=big, headers=headers, timeout=30)
        assert response.status_code == 413
        bomb = gzip.compress(b" " * 100_000)  # small on the wire, large once inflated
        response = httpx.post(f"{served.url}/v2/models/tiny/infer", content=bomb, timeout=30,
                              headers={**headers, "Content-Encoding": "gzip"})  # fmt: skip
        assert response.status_code == 413
        assert "inflates past" in response.json()["error"]


def test_a_request_needs_no_content_type(endpoint: Served) -> None:
    headers = {"Authorization": f"Bearer {endpoint.fleet.admin_key}"}
    request = httpx.Request("POST", f"{endpoint.url}/v2/models/tiny/infer", content=_json(inputs=[GOOD_INPUT]),
                            headers=headers)  # fmt: skip
    assert "content-type" not in request.headers
    with httpx.Client(timeout=30) as http:
        response = http.send(request)
    assert response.status_code == 200, response.text


def test_unknown_paths_answer_the_error_shape(endpoint: Served) -> None:
    response = httpx.get(f"{endpoint.url}/v2/nothing-here", timeout=30)
    assert response.status_code == 404
    assert "error" in response.json()

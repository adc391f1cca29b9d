"""End to end: whatever form a client sends, the device's fallback forwards what the local model would run.

A real agent (its localhost OIP server and its Python API) with nothing local to answer (``not_ready``,
or a local runtime that crashes) falls back to the real cloud endpoint on loopback, which checks every
input's datatype exactly. The device converts each input to the model's declared datatype first, with
the one function its Predictor uses (:func:`bundles.tensors.conform`): JSON numbers sent as FP64 or INT64
for an FP32 model, FP32 or FP64 for an FP16 one, INT32 for an INT64 one, text for BYTES, in JSON and in
the binary tensor form (client to device, and device to cloud for large inputs). Every answer must come
from the cloud (``source=cloud``) with the model's outputs. A request the cloud refuses as the client's
error comes back with the same 4xx and leaves the circuit breaker closed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bundles import oip
from bundles.testing import build_bundle_dir, reference_classifier
from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.fallback import CLOSED
from device_agent.httpapi import AgentHttpServer
from device_agent.identity import Enrollment
from fleet_server.inference.app import create_inference_app
from tests.fleet_server.conftest import auth
from tests.fleet_server.inference import conftest as inference_fixtures
from tests.fleet_server.inference.conftest import Fleet, configured_for, publish_dir, serve, write_graph_variant

fleet = inference_fixtures.fleet  # this module's fleet server with published bundles (a fixture)

X = np.random.default_rng(5).uniform(-2, 2, size=(3, 4))
HALF = np.array([[1.5, -2.0], [0.25, 4.0]])
TEXT = ["héllo", "wörld"]
X_INT = np.round(X).astype(np.int64)
COUNTS = np.array([[1, -2, 3], [40, 50, -60]])


def build_counter_bundle(bundle_dir: Path) -> Any:
    """``counter@1``: an ONNX model that doubles an INT64 input (golden case included)."""
    from onnx import TensorProto, helper

    from bundles.manifest import DriftBaseline, Golden, GoldenCase, TensorSpec
    from bundles.tensors import encode_tensor
    from bundles.testing import write_manifest

    base = build_bundle_dir(bundle_dir, name="counter", version=1)
    graph = helper.make_graph(
        [helper.make_node("Add", ["n", "n"], ["n_out"])], "counter",
        [helper.make_tensor_value_info("n", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("n_out", TensorProto.INT64, ["batch", 3])],
    )  # fmt: skip
    variant = write_graph_variant(bundle_dir, base, graph)
    counts = COUNTS.astype(np.int64)
    manifest = dataclasses.replace(
        base, name="counter", task="other", inputs=(TensorSpec("n", "int64", (-1, 3)),),
        outputs=(TensorSpec("n_out", "int64", (-1, 3)),), features=(), postprocess=(), variants=(variant,),
        drift_baseline=DriftBaseline(),
        golden=Golden(cases=(GoldenCase({"n": encode_tensor(counts)}, {"n_out": encode_tensor(counts * 2)}),)),
    )  # fmt: skip
    write_manifest(bundle_dir, manifest)
    return manifest


def build_softmax_bundle(bundle_dir: Path) -> Any:
    """``soft@1``: the reference classifier whose post-processing replaces its logits by their softmax (in place)."""
    from bundles.manifest import Step
    from bundles.testing import write_manifest

    manifest = dataclasses.replace(build_bundle_dir(bundle_dir, name="soft", version=1), postprocess=(Step("softmax"),))
    write_manifest(bundle_dir, manifest)
    return manifest


def build_tolerant_bundle(bundle_dir: Path) -> Any:
    """``tolerant@1``: the reference classifier whose input schema allows NaN and infinities."""
    from bundles.testing import write_manifest

    manifest = build_bundle_dir(bundle_dir, name="tolerant", version=1)
    spec = manifest.inputs[0]
    inputs = (dataclasses.replace(spec, extra={**spec.extra, "allow_non_finite": True}),)
    manifest = dataclasses.replace(manifest, inputs=inputs)
    write_manifest(bundle_dir, manifest)
    return manifest


@pytest.fixture(scope="module")
def cloud(fleet: Fleet) -> Iterator[str]:  # noqa: F811 - the fixture above
    """The real inference endpoint on loopback; the device is also assigned ``counter@1`` (an INT64 input),
    ``soft@1`` (post-processing in place) and ``tolerant@1`` (NaN allowed)."""
    builders = {"counter": build_counter_bundle, "soft": build_softmax_bundle, "tolerant": build_tolerant_bundle}
    for name, build in builders.items():
        publish_dir(fleet.release, fleet.work / name, build(fleet.work / name))
        body = {"device_id": fleet.device_id, "model_name": name, "bundle_version": 1, "pinned": True}
        answer = fleet.client.put("/api/v1/admin/assignments", headers=auth(fleet.admin_key), json=body)
        assert answer.status_code == 200, answer.text
    with serve(create_inference_app(configured_for(fleet))) as url:
        yield url


@dataclasses.dataclass
class Device:
    agent: Agent
    url: str

    def infer(self, model: str, body: bytes, binary_header: int | None = None) -> tuple[int, dict[str, Any]]:
        """POST an OIP request to the device; (status, answer with its outputs decoded as arrays)."""
        headers = {} if binary_header is None else {"Inference-Header-Content-Length": str(binary_header)}
        response = httpx.post(f"{self.url}/v2/models/{model}/infer", content=body, headers=headers, timeout=30)
        header, payload = oip.split_body(response.content, response.headers.get("inference-header-content-length"))
        answer: dict[str, Any] = json.loads(header)
        if response.status_code == 200:
            answer["arrays"] = oip.decode_answer(answer, payload)
        return response.status_code, answer


def _device(tmp_path: Path, arranged: Fleet, cloud_url: str) -> Iterator[Device]:
    """An enrolled device whose saved desired state is the fleet's own (its fallback: ``cloud_url``), HTTP on."""
    config = load_config(environ={}, state_dir=tmp_path / "agent", serving={"cache_entries": 0})
    config.ensure_state_dir()
    server_url = arranged.settings.public_url
    Enrollment(
        server_url=server_url, device_id=arranged.device_id, access_token=arranged.device_token, status="accepted",
        metadata_url=f"{server_url}/tuf/metadata", targets_url=f"{server_url}/tuf/targets",
    ).save(config.identity_dir, {})  # fmt: skip
    arranged.settings.fallback_url = f"{cloud_url}/v2"
    try:
        desired = arranged.client.get("/api/v1/device/desired-state", headers=auth(arranged.device_token))
    finally:
        arranged.settings.fallback_url = None
    assert desired.status_code == 200, desired.text
    (config.state_dir / "desired.json").write_text(json.dumps({"state": desired.json(), "etag": '"1"'}))
    agent = Agent.build(config, follow_pointers=False, telemetry=False)  # as the daemon builds it
    assert agent.pipeline.config.cloud_url == f"{cloud_url}/v2"
    server = AgentHttpServer(agent, "127.0.0.1", 0).start()
    try:
        yield Device(agent, server.url)
    finally:
        server.stop()
        agent.close()


@pytest.fixture
def device(tmp_path: Path, fleet: Fleet, cloud: str) -> Iterator[Device]:  # noqa: F811
    """Nothing installed: the local model is not ready."""
    yield from _device(tmp_path, fleet, cloud)


# --- the forms a client may send ----------------------------------------------------------------


def json_body(*tensors: tuple[str, str, Any], **extra: Any) -> bytes:
    """An OIP JSON request: (name, datatype, array-like) per input; numbers as JSON numbers."""
    inputs = []
    for name, datatype, value in tensors:
        array = np.asarray(value)
        data = array.tolist() if datatype != "BYTES" else [str(v) for v in array.reshape(-1)]
        inputs.append({"name": name, "shape": list(array.shape), "datatype": datatype, "data": data})
    return json.dumps({"inputs": inputs, **extra}).encode()


def binary_body(*tensors: tuple[str, Any]) -> tuple[bytes, int]:
    """An OIP binary-extension request (numeric tensors as raw bytes, BYTES length-prefixed), binary outputs."""
    specs, chunks = [], []
    for name, value in tensors:
        spec, raw = oip.encode_output(name, np.asarray(value), binary=True)
        specs.append(spec)
        chunks.append(raw or b"")
    header = json.dumps({"inputs": specs, "parameters": {"binary_data_output": True}}).encode()
    return header + b"".join(chunks), len(header)


def tiny_logits(x: Any) -> np.ndarray:
    return np.asarray(reference_classifier().logits(np.asarray(x, np.float32)))


HTTP_FORMS = {
    "tiny FP64 JSON (numbers as float64)": ("tiny", lambda: (json_body(("x", "FP64", X)), None)),
    "tiny FP32 JSON": ("tiny", lambda: (json_body(("x", "FP32", X.astype(np.float32))), None)),
    "tiny INT64 JSON (integers for a float model)": ("tiny", lambda: (json_body(("x", "INT64", X_INT)), None)),
    "tiny FP64 binary": ("tiny", lambda: binary_body(("x", X))),
    "echo BYTES + FP32 JSON for FP16": (
        "echo",
        lambda: (json_body(("text", "BYTES", TEXT), ("half", "FP32", HALF)), None),
    ),
    "echo BYTES + FP64 binary for FP16": ("echo", lambda: binary_body(("text", np.array(TEXT)), ("half", HALF))),
    "counter INT32 JSON for INT64": ("counter", lambda: (json_body(("n", "INT32", COUNTS)), None)),
    "counter INT32 binary for INT64": ("counter", lambda: binary_body(("n", COUNTS.astype(np.int32)))),
}


def check_outputs(model: str, outputs: dict[str, np.ndarray], x: Any = X) -> None:
    """The model's own answer (to ``x`` for tiny), whichever form the request came in."""
    if model == "tiny":
        np.testing.assert_allclose(outputs["logits"], tiny_logits(x), atol=1e-5)
        assert [str(v) for v in outputs["label"]] == [f"c{i}" for i in tiny_logits(x).argmax(axis=1)]
    elif model == "echo":
        assert [str(v) for v in outputs["text_out"]] == TEXT
        np.testing.assert_array_equal(outputs["half_out"], (HALF * 2).astype(np.float16))
    else:
        np.testing.assert_array_equal(outputs["n_out"], COUNTS * 2)


@pytest.mark.parametrize("form", sorted(HTTP_FORMS))
def test_every_http_form_is_answered_by_the_cloud_when_nothing_local_serves(device: Device, form: str) -> None:
    model, make = HTTP_FORMS[form]
    body, binary_header = make()
    status, answer = device.infer(model, body, binary_header)
    assert status == 200, answer
    assert answer["parameters"]["source"] == "cloud" and answer["parameters"]["fallback_reason"] == "not_ready"
    check_outputs(model, answer["arrays"], X_INT if "INT64" in form else X)
    assert device.agent.pipeline.breaker(model).state == CLOSED


PYTHON_FORMS = {
    "tiny nested lists of floats": ("tiny", lambda: {"x": X.tolist()}, X),
    "tiny float64 array, large enough for the binary form": (
        "tiny",
        lambda: {"x": np.resize(X, (2048, 4))},
        np.resize(X, (2048, 4)),
    ),
    "tiny int64 array": ("tiny", lambda: {"x": X_INT}, X_INT),
    "echo list of str and float32": ("echo", lambda: {"text": TEXT, "half": HALF.astype(np.float32)}, None),
    "counter int32 array": ("counter", lambda: {"n": COUNTS.astype(np.int32)}, None),
}


@pytest.mark.parametrize("form", sorted(PYTHON_FORMS))
def test_every_python_form_is_answered_by_the_cloud_when_nothing_local_serves(device: Device, form: str) -> None:
    model, make, x = PYTHON_FORMS[form]
    result = device.agent.predict(make(), model=model)
    assert (result.source, result.fallback_reason) == ("cloud", "not_ready")
    check_outputs(model, result.outputs, x)


def test_a_local_model_that_crashes_is_answered_by_the_cloud_with_its_declared_dtypes(
    device: Device, tmp_path: Path
) -> None:
    """With a local manifest, the fallback converts by it (no metadata request) and answers ``local_error``."""
    build_bundle_dir(tmp_path / "tiny-1", name="tiny", version=1)  # the bytes of the published tiny@1
    device.agent.engine.load("tiny", tmp_path / "tiny-1", "onnx-fp32")

    def crash(_feeds: Any) -> Any:
        raise RuntimeError("the local runtime crashed")

    device.agent.engine._active["tiny"].predictor.runtime.run = crash  # noqa: SLF001 - inject the local failure only
    status, answer = device.infer("tiny", json_body(("x", "FP64", X)))
    assert status == 200, answer
    assert (answer["parameters"]["source"], answer["parameters"]["fallback_reason"]) == ("cloud", "local_error")
    check_outputs("tiny", answer["arrays"])


def test_a_version_asked_in_the_path_is_the_version_the_cloud_runs(device: Device, tmp_path: Path) -> None:
    """``/versions/2/infer`` served locally by v2 (crashing): the cloud runs v2 too, not the device's assigned v1."""
    build_bundle_dir(tmp_path / "tiny-2", name="tiny", version=2, seed=2)
    device.agent.engine.load("tiny", tmp_path / "tiny-2", "onnx-fp32")

    def crash(_feeds: Any) -> Any:
        raise RuntimeError("the local runtime crashed")

    device.agent.engine._active["tiny"].predictor.runtime.run = crash  # noqa: SLF001 - inject the local failure only
    response = httpx.post(f"{device.url}/v2/models/tiny/versions/2/infer", content=json_body(("x", "FP32", X)))
    assert response.status_code == 200, response.text
    assert (response.json()["parameters"]["source"], response.json()["model_version"]) == ("cloud", "2")
    assert device.infer("tiny", json_body(("x", "FP32", X)))[1]["model_version"] == "1"  # no version: the assigned


@pytest.mark.parametrize("local", [False, True], ids=["nothing local", "local model crashing"])
def test_nan_in_an_input_whose_schema_allows_it_is_answered_by_the_cloud_too(
    device: Device, tmp_path: Path, local: bool
) -> None:
    """The device takes NaN in ``allow_non_finite`` inputs; the cloud used to refuse any NaN (400).

    With nothing local, the cloud applies the schema; with the local model loaded (and crashing), the device does.
    """
    if local:
        build_tolerant_bundle(tmp_path / "tolerant")
        build_bundle_dir(tmp_path / "tiny", name="tiny", version=1)
        for model in ("tolerant", "tiny"):
            device.agent.engine.load(model, tmp_path / model, "onnx-fp32")
            device.agent.engine._active[model].predictor.runtime.run = _crash  # noqa: SLF001 - the local failure
    body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP64","data":[NaN,1,2,Infinity]}]}'
    status, answer = device.infer("tolerant", body)
    assert status == 200 and answer["parameters"]["source"] == "cloud", answer
    status, answer = device.infer("tiny", body)
    assert status == 400 and "NaN" in answer["error"], answer  # the schema does not allow it: refused


def _crash(_feeds: Any) -> Any:
    raise RuntimeError("the local runtime crashed")


def test_a_cloud_answer_is_post_processed_once_like_the_local_one(device: Device, tmp_path: Path) -> None:
    """The endpoint answers post-processed outputs: the device must not post-process them again."""
    manifest = build_softmax_bundle(tmp_path / "soft-1")
    device.agent.engine.load("soft", tmp_path / "soft-1", "onnx-fp32")
    local = device.agent.predict({"x": X}, model="soft")
    assert local.source == "local"

    def crash(_feeds: Any) -> Any:
        raise RuntimeError("the local runtime crashed")

    device.agent.engine._active["soft"].predictor.runtime.run = crash  # noqa: SLF001 - inject the local failure only
    status, answer = device.infer("soft", json_body(("x", "FP32", X)))
    assert status == 200 and answer["parameters"]["source"] == "cloud", answer
    np.testing.assert_allclose(answer["arrays"]["logits"], local.outputs["logits"], atol=1e-6)
    assert answer["model_version"] == str(manifest.version)  # the version the cloud ran, not null


@pytest.mark.parametrize(
    ("model", "body", "status", "words"),
    [
        ("tiny", json_body(("x", "FP32", np.zeros((1, 5)))), 400, "shape"),  # refused by the cloud
        ("counter", json_body(("n", "FP64", COUNTS + 0.5)), 400, "cannot be used as int64"),  # as the local path
        ("echo", json_body(("text", "BYTES", TEXT)), 400, "half"),  # an input missing
    ],
    ids=["wrong shape", "float for an int model", "missing input"],
)
def test_a_request_the_cloud_refuses_is_the_clients_error_and_keeps_the_breaker_closed(
    device: Device, model: str, body: bytes, status: int, words: str
) -> None:
    for _ in range(device.agent.pipeline.config.breaker_failures + 1):
        got, answer = device.infer(model, body)
        assert got == status and words in answer["error"], answer
    breaker = device.agent.pipeline.breaker(model)
    assert (breaker.state, breaker.failures) == (CLOSED, 0)
    assert device.infer(model, HTTP_FORMS[next(f for f in HTTP_FORMS if f.startswith(model))][1]()[0])[0] == 200


def test_a_body_the_cloud_finds_too_large_is_a_413(device: Device, fleet: Fleet) -> None:  # noqa: F811
    with serve(create_inference_app(configured_for(fleet, max_body_bytes=4096))) as small:
        device.agent.follow_fallback({"url": f"{small}/v2", "model": "tiny"})  # the next desired state moved it
        got, answer = device.infer("tiny", json_body(("x", "FP32", np.resize(X, (64, 4)))))
        assert got == 413 and "limit" in answer["error"], answer
        assert device.agent.pipeline.breaker("tiny").state == CLOSED

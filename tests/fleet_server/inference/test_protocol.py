"""The Open Inference Protocol as an unchanged ``tritonclient`` sees it, against the real endpoint on loopback."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bundles.testing import reference_classifier
from tests.fleet_server.inference.conftest import Served


def client_for(served: Served, token: str) -> Any:
    return triton.InferenceServerClient(served.host_port, connection_timeout=10, network_timeout=30)


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def x_rows(n: int = 3) -> np.ndarray:
    return np.random.default_rng(7).uniform(-2, 2, size=(n, 4)).astype(np.float32)


def test_health_and_server_metadata_answer_without_credentials(endpoint: Served) -> None:
    client = client_for(endpoint, "")
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "edgefleet"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_names_the_tensors_with_and_without_a_version(endpoint: Served) -> None:
    client = client_for(endpoint, "")
    token = endpoint.fleet.admin_key
    newest = client.get_model_metadata("tiny", headers=headers(token))
    assert newest["versions"] == ["2"]
    assert newest["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    pinned = client.get_model_metadata("tiny", "1", headers=headers(token))
    assert pinned["versions"] == ["1"]
    assert client.is_model_ready("tiny", "1", headers=headers(token))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_answers_the_models_logits_as_json_or_binary(endpoint: Served, binary: bool) -> None:
    client = client_for(endpoint, "")
    x = x_rows()
    given = triton.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=binary)
    wanted = [triton.InferRequestedOutput("logits", binary_data=binary),
              triton.InferRequestedOutput("label", binary_data=binary)]  # fmt: skip
    result = client.infer("tiny", [given], model_version="1", outputs=wanted, request_id="req-42",
                          headers=headers(endpoint.fleet.admin_key))  # fmt: skip
    expected = reference_classifier().logits(x)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").tolist()]
    assert labels == [f"c{i}" for i in expected.argmax(axis=1)]
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["logits", "label"]


def test_infer_without_outputs_returns_every_output(endpoint: Served) -> None:
    client = client_for(endpoint, "")
    given = triton.InferInput("x", [2, 4], "FP32")
    given.set_data_from_numpy(x_rows(2))
    result = client.infer("tiny", [given], headers=headers(endpoint.fleet.admin_key))
    names = {o["name"] for o in result.get_response()["outputs"]}
    assert {"logits", "probabilities", "class_index", "label"} <= names


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bytes_and_fp16_tensors_round_trip(endpoint: Served, binary: bool) -> None:
    client = client_for(endpoint, "")
    text = np.array(["ünïcode", "plain", ""], dtype=object)
    half = np.array([[0.5, 1.0], [-3.25, 2.0], [65.0, 0.125]], dtype=np.float16)
    inputs = [triton.InferInput("text", [3], "BYTES"), triton.InferInput("half", [3, 2], "FP16")]
    inputs[0].set_data_from_numpy(text, binary_data=binary)
    inputs[1].set_data_from_numpy(half, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("text_out", "half_out")]
    result = client.infer("echo", inputs, outputs=outputs, headers=headers(endpoint.fleet.admin_key))
    echoed = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("text_out").tolist()]
    assert echoed == list(text)
    doubled = result.as_numpy("half_out")
    assert doubled.dtype == np.float16
    np.testing.assert_array_equal(doubled, half * 2)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_inflated(endpoint: Served, algorithm: str) -> None:
    client = client_for(endpoint, "")
    x = x_rows(2)
    given = triton.InferInput("x", [2, 4], "FP32")
    given.set_data_from_numpy(x, binary_data=True)
    result = client.infer(
        "tiny", [given], outputs=[triton.InferRequestedOutput("logits")], model_version="2",
        request_compression_algorithm=algorithm, headers=headers(endpoint.fleet.admin_key),
    )  # fmt: skip
    assert result.as_numpy("logits").shape == (2, 3)


def test_a_device_gets_its_own_assigned_version_and_only_its_fleets_models(endpoint: Served) -> None:
    client = client_for(endpoint, "")
    given = triton.InferInput("x", [1, 4], "FP32")
    given.set_data_from_numpy(x_rows(1))
    result = client.infer("tiny", [given], headers=headers(endpoint.fleet.device_token))
    assert result.get_response()["model_version"] == "1"  # its assignment, not the newest (2)
    with pytest.raises(InferenceServerException, match="its fleet is not assigned"):
        client.infer("tiny", [given], headers=headers(endpoint.fleet.other_device_token))


def test_calls_without_credentials_are_refused(endpoint: Served) -> None:
    client = client_for(endpoint, "")
    given = triton.InferInput("x", [1, 4], "FP32")
    given.set_data_from_numpy(x_rows(1))
    with pytest.raises(InferenceServerException, match="bearer token"):
        client.infer("tiny", [given])
    with pytest.raises(InferenceServerException, match="unknown or revoked"):
        client.infer("tiny", [given], headers=headers("efd_not-a-real-token"))


def test_repository_index_load_and_unload(endpoint: Served) -> None:
    client = client_for(endpoint, "")
    operator = headers(endpoint.fleet.operator_key)
    client.load_model("tiny", headers=operator)
    index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index(headers=operator)}
    assert index[("tiny", "2")] == "READY"
    client.unload_model("tiny", headers=operator)
    index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index(headers=operator)}
    assert index[("tiny", "2")] == "UNLOADED"
    with pytest.raises(InferenceServerException, match="role operator"):
        client.load_model("tiny", headers=headers(endpoint.fleet.viewer_key))


def test_the_devices_fallback_client_reads_binary_bytes_and_fp16_answers(endpoint: Served) -> None:
    """Past 16 KiB the device asks for binary outputs; the endpoint sends BYTES ones binary too."""
    from device_agent.fallback import OipClient

    rows = 4096  # 4096 x 2 FP16 = 16 KiB: the client switches to the binary extension
    text = np.array([f"row {i}" for i in range(rows)], dtype=object)
    half = np.random.default_rng(5).uniform(-4, 4, (rows, 2)).astype(np.float16)
    client = OipClient(endpoint.url + "/v2", timeout_s=10, headers=headers(endpoint.fleet.device_token))
    try:
        answer = client.infer("echo", {"text": text, "half": half})
    finally:
        client.close()
    outputs = answer.outputs
    assert answer.postprocessed and answer.version == 1  # final outputs: the device does not post-process them
    assert list(outputs["text_out"]) == list(text)
    np.testing.assert_array_equal(outputs["half_out"], half * 2)

"""Serving behaviour: dynamic batching, the bounded queue, deadlines, the memory budget, the self-test gate."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from typing import Any

import httpx
import numpy as np

from tests.fleet_server.inference.conftest import Served

BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.5, 1.0, -1.0, 2.0]}]})


def post(
    served: Served, model: str = "tiny", extra: dict[str, str] | None = None, version: str = "2"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {served.fleet.admin_key}", **(extra or {})}
    url = f"{served.url}/v2/models/{model}/versions/{version}/infer"
    return httpx.post(url, content=BODY, headers=headers, timeout=30)


def metric(served: Served, name: str, model: str = "tiny") -> float:
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    pattern = rf'^{re.escape(name)}\{{model="{model}"\}} (\S+)$'
    found = re.findall(pattern, text, re.MULTILINE)
    return float(found[0]) if found else 0.0


def test_concurrent_requests_are_answered_in_shared_batches(make_endpoint: Any) -> None:
    with make_endpoint(max_queue_delay_us=20_000, max_batch_size=16) as served:
        assert post(served).status_code == 200  # loaded
        calls_before = metric(served, "edgefleet_inference_batch_size_count")
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: post(served), range(32)))
        assert all(a.status_code == 200 for a in answers)
        logits = {tuple(np.round(a.json()["outputs"][0]["data"], 5)) for a in answers}
        assert len(logits) == 1  # every request got its own row back, the same row
        calls = metric(served, "edgefleet_inference_batch_size_count") - calls_before
        rows = metric(served, "edgefleet_inference_batch_size_sum")
        assert calls < 32  # fewer model calls than requests
        assert rows >= 33
        assert metric(served, "edgefleet_inference_queue_seconds_count") >= 33


def test_a_full_queue_answers_429_with_retry_after(make_endpoint: Any) -> None:
    with make_endpoint(max_queue=1, max_queue_delay_us=300_000, max_batch_size=64) as served:
        assert post(served).status_code == 200
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: post(served), range(6)))
        refused = [a for a in answers if a.status_code == 429]
        assert refused and any(a.status_code == 200 for a in answers)
        assert refused[0].headers["Retry-After"] == "1"
        assert "waiting" in refused[0].json()["error"]


def test_a_request_past_its_deadline_is_answered_504_and_never_run(make_endpoint: Any) -> None:
    with make_endpoint(max_queue_delay_us=400_000, max_batch_size=64) as served:
        assert post(served).status_code == 200
        calls_before = metric(served, "edgefleet_inference_batch_size_count")
        late = post(served, extra={"Inference-Deadline-Ms": "30"})
        assert late.status_code == 504
        assert "deadline" in late.json()["error"]
        assert post(served, extra={"Inference-Deadline-Ms": "5000"}).status_code == 200
        assert metric(served, "edgefleet_inference_batch_size_count") - calls_before == 1  # only the second ran


def test_the_least_recently_used_model_is_unloaded_to_stay_in_the_memory_budget(make_endpoint: Any) -> None:
    with make_endpoint() as probe:
        assert post(probe, version="1").status_code == 200
        one_model_bytes = probe.app.state.endpoint.repository.used_bytes()
    with make_endpoint(memory_budget_mb=1.5 * one_model_bytes / 2**20) as served:
        assert post(served, version="1").status_code == 200
        assert post(served, version="2").status_code == 200
        states = {(m["name"], m["version"]): m["state"] for m in index(served)}
        assert states[("tiny", "2")] == "READY"
        assert states[("tiny", "1")] == "UNLOADED"
        assert post(served, version="1").status_code == 200  # loads again, unloading version 2


def test_a_model_that_fails_its_golden_self_test_is_never_served(endpoint: Served) -> None:
    answer = post(endpoint, model="broken", version="1")
    assert answer.status_code == 503
    assert "self-test failed" in answer.json()["error"]
    ready = httpx.get(f"{endpoint.url}/v2/models/broken/ready", timeout=10,
                      headers={"Authorization": f"Bearer {endpoint.fleet.admin_key}"})  # fmt: skip
    assert ready.status_code == 503
    assert "self-test failed" in ready.json()["error"]
    states = {(m["name"], m["version"]): m for m in index(endpoint)}
    assert states[("broken", "1")]["state"] == "UNAVAILABLE"


def test_eager_loading_is_ready_only_once_the_models_are_loaded(make_endpoint: Any) -> None:
    with make_endpoint(loading="eager", models=["tiny@1", "echo"]) as served:
        for _ in range(200):
            if httpx.get(f"{served.url}/v2/health/ready", timeout=10).status_code == 200:
                break
            time.sleep(0.05)
        states = {(m["name"], m["version"]): m["state"] for m in index(served)}
        assert states[("tiny", "1")] == "READY" and states[("echo", "1")] == "READY"
    with make_endpoint(loading="eager", models=["broken@1"]) as served:
        for _ in range(200):
            ready = httpx.get(f"{served.url}/v2/health/ready", timeout=10)
            if "self-test" in ready.text:
                break
            time.sleep(0.05)
        assert ready.status_code == 503


def index(served: Served) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {served.fleet.admin_key}"}
    answer: list[dict[str, Any]] = httpx.post(f"{served.url}/v2/repository/index", headers=headers, timeout=10).json()
    return answer


def test_while_serving_young_collections_are_rarer_and_a_loaded_models_objects_are_frozen(make_endpoint: Any) -> None:
    """The collector settings of fleet_server.inference.heap hold for the app's life and are undone after."""
    import gc

    from fleet_server.inference.heap import YOUNG_THRESHOLD

    before = gc.get_threshold()
    with make_endpoint() as served:
        gc.unfreeze()  # what an earlier endpoint froze; the load below must freeze again
        assert post(served).status_code == 200  # the first request loads tiny@2
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before

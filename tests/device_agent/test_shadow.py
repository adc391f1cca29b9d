"""Shadow mode on the device: a candidate bundle runs beside the active one on live inputs.

A real agent installs tiny@1 through the real update machine; the daemon's desired state then names
tiny@2 as its shadow. The bundle source is :class:`DirectorySource` (the TUF client behind the same
interface is exercised for real in tests/e2e), the models are real ONNX bundles, the recorder real.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.daemon import Daemon
from device_agent.shadow import SHADOW_SLOT, top1_agrees
from tests.device_agent.helpers import DirectorySource, entry, publish_bundle

ROWS = np.random.default_rng(5).normal(0.0, 1.5, size=(40, 4)).astype(np.float32)


def device(tmp_path: Path, *, bad_shadow: bool = False) -> tuple[Agent, Daemon]:
    targets = tmp_path / "targets"
    publish_bundle(targets, tmp_path / "work", "tiny", 1)
    publish_bundle(targets, tmp_path / "work", "tiny", 2, bad_golden=bad_shadow)
    agent = Agent.from_config(environ={}, state_dir=tmp_path / "device", min_free_disk_bytes=0, health_runs=2)
    agent.updater.set_source(DirectorySource(targets, tmp_path / "device" / "cache"))
    daemon = Daemon(agent)
    daemon.desired = {"models": [entry("tiny", 1)]}
    daemon.apply()
    return agent, daemon


def with_shadow(version: int) -> dict[str, Any]:
    return {
        "models": [
            {**entry("tiny", 1), "shadow": {"version": version, "manifest_target": f"tiny/{version}/manifest.json"}}
        ]
    }


def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def idle(shadow: object) -> bool:
    """The shadow's run has finished entirely (its gate released: the next request will be compared)."""
    gate = shadow.gate  # type: ignore[attr-defined]
    if not gate.acquire(blocking=False):
        return False
    gate.release()
    return True


def test_the_shadow_runs_beside_the_active_model_and_only_the_active_answer_is_returned(tmp_path: Path) -> None:
    agent, daemon = device(tmp_path)
    daemon.desired = with_shadow(2)
    daemon.apply()
    slots = agent.updater.slots.model("tiny")
    assert slots.info(SHADOW_SLOT) is not None and slots.info(SHADOW_SLOT).version == 2
    assert slots.pointer().committed in ("a", "b"), "the A/B slots are untouched"
    shadow = agent.pipeline.shadow("tiny")
    assert shadow is not None

    expected_v2 = [str(shadow.predictor.predict({"x": r[None, :]}).outputs["label"][0]) for r in ROWS]
    answers = []
    for row in ROWS:
        result = agent.predict({"x": row[None, :]})
        assert (result.source, result.version) == ("local", 1)
        answers.append(str(result.outputs["label"][0]))
        wait_for(lambda: shadow.compared + shadow.skipped >= len(answers) and idle(shadow))  # one run per request
    agreed = sum(a == b for a, b in zip(answers, expected_v2, strict=True))
    assert shadow.compared == len(ROWS) and shadow.agreed == agreed and shadow.errors == 0
    assert 0 < agreed < len(ROWS), "two differently seeded models agree on some rows, not all"

    daemon.heartbeat(agent.inventory())
    agent.recorder.flush()
    batch = agent.recorder.buffer.next_batch(max_items=1000, max_bytes=10_000_000)
    assert batch is not None
    shadow_windows = [w for w in batch.windows if w["version"] == 2]  # two if the run crossed a window boundary
    assert sum(w["shadow"]["compared"] for w in shadow_windows) == len(ROWS)
    assert sum(w["shadow"]["agreed"] for w in shadow_windows) == agreed
    assert sum(w["shadow"]["latency_ms_sum"] for w in shadow_windows) > 0
    assert all(w["counters"]["requests"] == 0 for w in shadow_windows)
    (beat,) = [e for e in batch.events if e["type"] == "heartbeat"]
    assert {"name": "tiny", "version": 2, "state": "shadow"} in beat["models"]
    agent.close()


def test_a_desired_state_without_shadow_stops_it_and_fallback_changes_keep_it(tmp_path: Path) -> None:
    agent, daemon = device(tmp_path)
    daemon.desired = with_shadow(2)
    daemon.apply()
    first = agent.pipeline.shadow("tiny")
    daemon.desired = {**with_shadow(2), "fallback": {"url": "http://127.0.0.1:9/v2", "model": "tiny"}}
    daemon.apply()
    assert agent.pipeline.shadow("tiny") is first, "a new pipeline for new fallback settings keeps the shadow"
    daemon.desired = {"models": [entry("tiny", 1)]}
    daemon.apply()
    assert agent.pipeline.shadow("tiny") is None and first.retired
    assert first.predictor.runtime.session is None, "the shadow's runtime was released"
    agent.predict({"x": ROWS[:1]})
    assert first.compared == 0
    agent.close()


def test_a_shadow_that_fails_its_golden_self_test_is_not_run(tmp_path: Path) -> None:
    agent, daemon = device(tmp_path, bad_shadow=True)
    daemon.desired = with_shadow(2)
    daemon.apply()
    assert agent.pipeline.shadow("tiny") is None
    assert any("self-test" in reason for reason in daemon.shadows.failed.values())
    assert agent.predict({"x": ROWS[:1]}).version == 1
    agent.close()


def test_agreement_is_the_label_when_both_answers_have_one_else_the_argmax() -> None:
    assert top1_agrees({"label": np.array(["c1"])}, {"label": np.array(["c1"]), "logits": np.zeros((1, 3))})
    assert not top1_agrees({"label": np.array(["c1"])}, {"label": np.array(["c2"])})
    logits = np.array([[0.1, 2.0, 0.3]], dtype=np.float32)
    assert top1_agrees({"y": logits}, {"y": logits * 3})
    assert not top1_agrees({"y": logits}, {"y": np.roll(logits, 1, axis=-1)})

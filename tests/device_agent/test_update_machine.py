"""State-chain tests of the update machine (after Mender's state_test.cpp).

Each case runs a real deployment (real bundles, real slots, real ONNX Runtime) with a failure or a
crash injected in one state; a crash is a BaseException that kills the "process", which is then
restarted from the persisted record. Whatever happens, the device ends with exactly one committed,
served, loadable model that passes its self-test.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import pytest

from bundles.errors import InstallError
from device_agent.update.machine import RESUME, TRANSITIONS, Step
from device_agent.update.record import DeploymentRecord
from device_agent.update.states import DeploymentStatus, Event, UpdateState
from tests.device_agent.helpers import Device, ListReporter, assert_one_committed_loadable, entry

S = UpdateState
HAPPY = [S.SYNC, S.DOWNLOAD, S.VERIFY_BUNDLE, S.STAGE, S.ACTIVATE, S.HEALTH_CHECK, S.COMMIT, S.CLEANUP, S.REPORT]
ROLLBACK_PATH = [S.CHECK_ROLLBACK, S.ROLLBACK, S.FAILURE, S.CLEANUP, S.REPORT]


class Crash(BaseException):
    """The process dies in the middle of a step (power cut, kill -9)."""


def chain(states: list[UpdateState], failed: UpdateState | None = None) -> list[str]:
    return [f"{s.value}:{'failure' if s is failed else 'success'}" for s in states]


class Harness:
    """A device with v1 committed, and fault injection that survives 'process restarts'."""

    def __init__(self, tmp_path: Path, targets: Path) -> None:
        self.state_dir, self.targets = tmp_path / "device", targets
        self.reporter = ListReporter()
        self.fail_in: set[UpdateState] = set()
        self.crash_in: dict[UpdateState, int] = {}  # state -> crashes left (-1: forever)
        self.crashes: collections.Counter[UpdateState] = collections.Counter()
        self.restarts = 0
        self.device = Device.start(self.state_dir, targets, self.reporter)
        self.device.updater.apply({"models": [entry("tiny", 1)]})
        self.reporter.reports.clear()
        self._instrument()

    def _instrument(self) -> None:
        steps = self.device.updater.machine.steps
        for state, step in list(steps.items()):
            steps[state] = self._wrap(state, step)

    def _wrap(self, state: UpdateState, step: Step) -> Step:
        def injected(record: DeploymentRecord) -> Event:
            left = self.crash_in.get(state, 0)
            if left != 0:
                self.crash_in[state] = left - 1 if left > 0 else -1
                self.crashes[state] += 1
                raise Crash(state.value)
            if state in self.fail_in:
                raise InstallError(f"injected failure in {state.value}")
            return step(record)

        return injected

    def restart(self) -> None:
        self.device.engine.close()
        self.restarts += 1
        self.device = Device.start(self.state_dir, self.targets, self.reporter)
        self._instrument()

    def deploy(self, version: int, max_restarts: int = 100) -> DeploymentRecord | None:
        """Deploy, restarting the 'process' after every crash until the deployment is over."""
        try:
            return self.device.updater.deploy(entry("tiny", version))
        except Crash:
            pass
        while self.restarts < max_restarts:
            self.restart()
            try:
                return self.device.updater.recover()
            except Crash:
                continue
        raise AssertionError("the device kept crashing: the loop guard did not end the deployment")

    def final_check(self) -> int:
        self.restart()
        self.device.updater.recover()
        version = assert_one_committed_loadable(self.state_dir, "tiny")
        served = self.device.engine.serving_dir("tiny")
        slots = self.device.updater.slots.model("tiny")
        assert served == slots.slot_dir(slots.pointer().committed or "")
        return version


def test_every_state_has_a_step_a_resume_entry_and_a_loop_exit() -> None:
    for state in UpdateState:
        if state is S.IDLE:
            continue
        assert state in RESUME
        assert (state, Event.SUCCESS) in TRANSITIONS or state is S.LOOP_ABORT
        if state is not S.LOOP_ABORT:
            assert TRANSITIONS[(state, Event.LOOP_DETECTED)] is S.LOOP_ABORT
        assert (state, Event.FAILURE) in TRANSITIONS


def test_first_install_on_an_empty_device_commits_and_serves(tmp_path: Path, published: Path) -> None:
    device = Device.start(tmp_path / "device", published)
    record = device.updater.deploy(entry("tiny", 2))
    assert record.status is DeploymentStatus.INSTALLED
    assert record.history == chain(HAPPY)
    assert assert_one_committed_loadable(tmp_path / "device", "tiny") == 2
    assert device.engine.ready("tiny")
    assert not list((tmp_path / "device" / "cache").rglob("*.tar.gz")), "the installed archive was not collected"
    assert not (tmp_path / "device" / "work").exists() or not any((tmp_path / "device" / "work").iterdir())


def test_update_keeps_the_previous_bundle_for_an_instant_rollback(tmp_path: Path, published: Path) -> None:
    h = Harness(tmp_path, published)
    record = h.deploy(2)
    assert record is not None and record.status is DeploymentStatus.INSTALLED
    slots = h.device.updater.slots.model("tiny")
    pointer = slots.pointer()
    assert pointer.previous is not None and slots.info(pointer.previous).version == 1  # type: ignore[union-attr]
    fetched_before = len(h.device.source.fetched)
    back = h.deploy(1)
    assert back is not None and back.status is DeploymentStatus.INSTALLED
    assert not any(t.endswith(".tar.gz") for t in h.device.source.fetched[fetched_before:]), "v1 was re-downloaded"
    assert h.final_check() == 1


def test_install_rolls_back_when_golden_check_fails(tmp_path: Path, published: Path) -> None:
    h = Harness(tmp_path, published)
    record = h.deploy(3)
    assert record is not None
    assert record.status is DeploymentStatus.ROLLED_BACK
    assert record.history == chain(HAPPY[:5]) + ["health-check:failure"] + chain(ROLLBACK_PATH)
    assert "self-test" in (record.error or "").lower() or "golden" in (record.error or "").lower()
    assert h.reporter.reports[-1]["status"] == "rolled-back"
    again = h.device.updater.deploy(entry("tiny", 3))
    assert again.status is DeploymentStatus.UP_TO_DATE, "a bundle that failed its self-test is retried"
    assert h.final_check() == 1


def test_install_rolls_back_when_the_latency_budget_is_exceeded(tmp_path: Path, published: Path) -> None:
    h = Harness(tmp_path, published)
    record = h.deploy(4)
    assert record is not None and record.status is DeploymentStatus.ROLLED_BACK
    assert "latency" in (record.error or "") and "budget" in (record.error or "")
    assert h.final_check() == 1


def test_first_install_that_fails_its_health_check_leaves_nothing_served(tmp_path: Path, published: Path) -> None:
    device = Device.start(tmp_path / "device", published)
    record = device.updater.deploy(entry("tiny", 3))
    assert record.status is DeploymentStatus.FAILED
    tail = chain([S.FAILURE, S.CLEANUP, S.REPORT])
    assert record.history[-5:] == ["health-check:failure", "check-rollback:nothing-to-do", *tail]
    assert not device.engine.ready("tiny")
    pointer = device.updater.slots.model("tiny").pointer()
    assert pointer.active is None and pointer.committed is None
    assert device.updater.deploy(entry("tiny", 1)).status is DeploymentStatus.INSTALLED


@pytest.mark.parametrize("state", HAPPY, ids=lambda s: s.value)
def test_injected_failure_in_each_state_of_an_update(tmp_path: Path, published: Path, state: UpdateState) -> None:
    h = Harness(tmp_path, published)
    h.fail_in = {state}
    record = h.deploy(2)
    assert record is not None
    survives = state in (S.CLEANUP, S.REPORT)
    assert h.final_check() == (2 if survives else 1)
    if state not in (S.SYNC, S.REPORT):
        assert h.reporter.reports, "a failed deployment was not reported"
        assert h.reporter.reports[-1]["status"] == ("installed" if survives else record.status.value)


@pytest.mark.parametrize("state", [S.CHECK_ROLLBACK, S.ROLLBACK, S.FAILURE, S.CLEANUP, S.REPORT], ids=lambda s: s.value)
def test_injected_failure_on_the_rollback_path(tmp_path: Path, published: Path, state: UpdateState) -> None:
    h = Harness(tmp_path, published)
    h.fail_in = {state}
    h.deploy(3)
    assert h.final_check() == 1


@pytest.mark.parametrize("state", HAPPY, ids=lambda s: s.value)
def test_crash_in_each_state_of_an_update_then_resume(tmp_path: Path, published: Path, state: UpdateState) -> None:
    h = Harness(tmp_path, published)
    h.crash_in = {state: 1}
    record = h.deploy(2)
    assert h.crashes[state] == 1 and h.restarts >= 1
    assert record is not None
    expected = 1 if state in (S.SYNC, S.DOWNLOAD, S.VERIFY_BUNDLE, S.STAGE) else 2
    assert h.final_check() == expected
    if expected == 1:
        assert record.status is DeploymentStatus.INTERRUPTED
        retried = h.device.updater.deploy(entry("tiny", 2))
        assert retried.status is DeploymentStatus.INSTALLED, "an interrupted update is not retried"
        assert h.final_check() == 2


@pytest.mark.parametrize("state", ROLLBACK_PATH, ids=lambda s: s.value)
def test_crash_on_the_rollback_path_then_resume(tmp_path: Path, published: Path, state: UpdateState) -> None:
    h = Harness(tmp_path, published)
    h.crash_in = {state: 1}
    record = h.deploy(3)
    assert record is not None and h.crashes[state] == 1
    assert h.final_check() == 1
    assert h.reporter.reports[-1]["status"] == "rolled-back"


@pytest.mark.parametrize(
    ("version", "state"),
    [
        (2, S.HEALTH_CHECK),
        (2, S.COMMIT),
        (3, S.CHECK_ROLLBACK),
        (3, S.ROLLBACK),
        (3, S.FAILURE),
        (2, S.CLEANUP),
        (2, S.REPORT),
    ],
    ids=lambda v: v.value if isinstance(v, UpdateState) else f"v{v}",
)
def test_crash_forever_trips_the_loop_guard(tmp_path: Path, published: Path, version: int, state: UpdateState) -> None:
    h = Harness(tmp_path, published)
    h.crash_in = {state: -1}
    h.deploy(version, max_restarts=80)
    assert h.crashes[state] >= 10
    h.crash_in = {}
    expected = 2 if state in (S.CLEANUP, S.REPORT) else 1
    assert h.final_check() == expected
    if state in (S.HEALTH_CHECK, S.COMMIT, S.CHECK_ROLLBACK):
        assert h.reporter.reports[-1]["status"] == "loop-detected"
        assert h.device.updater.deploy(entry("tiny", version)).status is DeploymentStatus.UP_TO_DATE


def test_the_state_diagram_in_docs_is_generated_from_the_current_table() -> None:
    from device_agent.update.machine import mermaid

    docs = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text()
    block = docs.split("<!-- BEGIN state-diagram -->")[1].split("<!-- END state-diagram -->")[0]
    assert block.strip() == f"```mermaid\n{mermaid()}\n```", "run: python -m device_agent.update.machine"


def test_a_target_with_a_future_start_after_waits(tmp_path: Path, published: Path) -> None:
    h = Harness(tmp_path, published)
    later = {**entry("tiny", 2), "start_after": "2999-01-01T00:00:00+00:00"}
    assert h.device.updater.apply({"models": [later]}) == []
    assert h.device.committed_version("tiny") == 1
    now = {**entry("tiny", 2), "start_after": "2000-01-01T00:00:00Z"}
    assert [r.status for r in h.device.updater.apply({"models": [now]})] == [DeploymentStatus.INSTALLED]


def test_inference_keeps_answering_through_updates_and_never_from_an_unverified_bundle(
    tmp_path: Path, published: Path
) -> None:
    import threading

    import numpy as np

    from bundles.testing import reference_classifier

    h = Harness(tmp_path, published)
    x = np.array([[0.3, -0.7, 1.1, 0.2]], dtype=np.float32)
    references = {v: reference_classifier(seed=v).logits(x) for v in (1, 2, 3, 4)}
    served: collections.Counter[int] = collections.Counter()
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                logits = h.device.engine.predict("tiny", {"x": x}).raw["logits"]
            except BaseException as e:  # noqa: BLE001 - every failure is a test failure
                errors.append(e)
                return
            served[min(references, key=lambda v: float(np.abs(references[v] - logits).max()))] += 1

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        statuses = [h.device.updater.deploy(entry("tiny", v)).status for v in (2, 3, 4, 1)]
    finally:
        stop.set()
        worker.join()
    assert statuses == [DeploymentStatus.INSTALLED, DeploymentStatus.ROLLED_BACK, DeploymentStatus.ROLLED_BACK,
                        DeploymentStatus.INSTALLED]  # fmt: skip
    assert not errors, errors
    assert served[1] > 0 and served[2] > 0
    assert served[3] == 0 and served[4] == 0, f"a bundle that failed its health check answered: {served}"


@pytest.mark.parametrize("state", [S.DOWNLOAD, S.STAGE, S.HEALTH_CHECK, S.COMMIT, S.ROLLBACK], ids=lambda s: s.value)
def test_a_record_that_cannot_be_saved_fails_the_deployment_safely(
    tmp_path: Path, published: Path, state: UpdateState
) -> None:
    h = Harness(tmp_path, published)
    store = h.device.updater.machine.store
    real_save = store.save

    def save(record: DeploymentRecord) -> None:
        if record.state is state:
            raise OSError(28, "No space left on device")
        real_save(record)

    store.save = save  # type: ignore[method-assign]
    record = h.deploy(3 if state is S.ROLLBACK else 2)
    assert record is not None
    if state is S.ROLLBACK:  # the way out carries on without its record
        assert record.status is DeploymentStatus.ROLLED_BACK
    else:
        assert "No space left" in (record.error or "") and record.status is not DeploymentStatus.INSTALLED
    assert h.final_check() == 1


def test_a_device_without_the_runtime_reports_incompatible_and_keeps_its_model(tmp_path: Path, published: Path) -> None:
    import dataclasses

    h = Harness(tmp_path, published)
    caps = h.device.updater.steps.capabilities()
    h.device.updater.steps.capabilities = lambda: dataclasses.replace(caps, runtimes={})
    record = h.deploy(2)
    assert record is not None and record.status is DeploymentStatus.INCOMPATIBLE
    assert "onnx-fp32" in (record.error or "")
    assert h.reporter.reports[-1]["status"] == "incompatible"
    assert not any(t.endswith(".tar.gz") for t in h.device.source.fetched[-1:]), "an unusable variant was downloaded"
    assert h.final_check() == 1


def _publish_tflite_validated_on_litert(targets: Path, work: Path, version: int) -> None:
    """tiny@version with onnx-fp32 and a tflite-fp32 variant validated on LiteRT only (as the converter writes it)."""
    from bundles.archive import pack_variant
    from bundles.manifest import ValidatedRuntime
    from bundles.testing import build_bundle_dir, write_manifest

    src = work / f"src-tflite-{version}"
    manifest = build_bundle_dir(src, name="tiny", version=version, seed=version, tflite=True)
    litert = ValidatedRuntime("litert", "2.3.0")
    variants = tuple(
        dataclasses.replace(v, requirements=dataclasses.replace(v.requirements, validated_runtimes=(litert,)))
        if v.target == "tflite" else v
        for v in manifest.variants
    )  # fmt: skip
    manifest = dataclasses.replace(manifest, variants=variants)
    write_manifest(src, manifest)
    out = targets / "tiny" / str(version)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_bytes(manifest.to_bytes())
    for variant in manifest.variants:
        pack_variant(src, manifest, variant.id, out / f"{variant.id}.tar.gz")


def test_a_variant_is_never_run_on_a_runtime_it_was_not_validated_on_and_the_report_says_why(
    tmp_path: Path, published: Path
) -> None:
    import shutil

    targets = tmp_path / "targets"
    shutil.copytree(published, targets)
    _publish_tflite_validated_on_litert(targets, tmp_path, 7)
    h = Harness(tmp_path, targets)
    caps = h.device.updater.steps.capabilities()
    onnx_version = caps.runtimes["onnxruntime"]
    old_board = dataclasses.replace(caps, runtimes={"tflite_runtime": "2.14.0", "onnxruntime": onnx_version})
    h.device.updater.steps.capabilities = lambda: old_board
    directed = {**entry("tiny", 7), "variant": "tflite-fp32"}  # a director that ignores the validation
    record = h.device.updater.deploy(directed)
    assert record.status is DeploymentStatus.INCOMPATIBLE
    assert "validated only on litert 2.3.0 (this device has onnxruntime" in (record.error or "")
    assert "tflite_runtime 2.14.0" in (record.error or "")
    assert not any(t.endswith("tflite-fp32.tar.gz") for t in h.device.source.fetched), "downloaded for nothing"
    litert_board = dataclasses.replace(caps, runtimes={"litert": "2.3.0"})
    h.device.updater.steps.capabilities = lambda: litert_board
    h.device.updater.failed.discard("tiny@7")  # the operator fixed the board: try again
    record = h.device.updater.deploy({**entry("tiny", 7), "variant": "tflite-fp32", "rollout_id": 2})
    assert record.status is DeploymentStatus.INSTALLED, record.error
    assert (record.selected_variant, record.selected_runtime, record.selected_runtime_version) == (
        "tflite-fp32", "litert", "2.3.0",
    )  # fmt: skip
    active = next(line for line in h.device.updater.installed() if line["state"] == "active")
    assert (active["variant"], active["runtime"], active["runtime_version"]) == ("tflite-fp32", "litert", "2.3.0")

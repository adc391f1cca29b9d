"""Hypothesis stateful test: random deployments with failures and crashes injected in random states.

Invariants after every step: the deployment record is gone, exactly one slot is committed and
served, it loads and passes its self-test, and it is never a bundle that fails its health check.
A deployment with no fault injected installs its target unless that target had failed for good.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from device_agent.update.states import UpdateState
from tests.device_agent.helpers import assert_one_committed_loadable
from tests.device_agent.test_update_machine import HAPPY, ROLLBACK_PATH, Harness

FAULT_STATES = sorted(set(HAPPY + ROLLBACK_PATH), key=lambda s: s.value)
GOOD, BAD = (1, 2), (3, 4)


class DeviceMachine(RuleBasedStateMachine):
    def __init__(self, published: Path) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="agent-stateful-"))
        self.h = Harness(self.tmp, published)

    @rule(version=st.sampled_from(GOOD + BAD), state=st.sampled_from(FAULT_STATES))
    def deploy_with_a_crash(self, version: int, state: UpdateState) -> None:
        self.h.crash_in = {state: 1}
        self.h.deploy(version)
        self.h.crash_in = {}

    @rule(version=st.sampled_from(GOOD + BAD), state=st.sampled_from(FAULT_STATES))
    def deploy_with_a_failure(self, version: int, state: UpdateState) -> None:
        self.h.fail_in = {state}
        self.h.deploy(version)
        self.h.fail_in = set()

    @rule(version=st.sampled_from(GOOD))
    def deploy_cleanly(self, version: int) -> None:
        failed_before = self.h.device.updater.failed.reason(f"tiny@{version}") is not None
        before = self.h.device.committed_version("tiny")
        self.h.deploy(version)
        after = self.h.device.committed_version("tiny")
        assert after == (before if failed_before else version)

    @rule()
    def restart(self) -> None:
        self.h.restart()
        self.h.device.updater.recover()

    @invariant()
    def exactly_one_committed_loadable_good_model(self) -> None:
        version = assert_one_committed_loadable(self.h.state_dir, "tiny")
        assert version in GOOD
        assert self.h.device.engine.ready("tiny")

    def teardown(self) -> None:
        self.h.device.engine.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def test_random_deployments_with_faults_keep_one_good_committed_model(published: Path) -> None:
    run_state_machine_as_test(
        lambda: DeviceMachine(published),
        settings=settings(
            max_examples=30, stateful_step_count=8, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        ),  # fmt: skip
    )

"""kill -9 of the real agent process at random moments of repeated updates: no device is ever left
without a working model.

Each cycle the server's desired state changes (tiny@1, @2 and a bundle whose golden check fails,
in turn), a fresh agent process runs one update round (``edgefleet-agent run --once``) and is killed
with SIGKILL after a random delay drawn over the length of a whole round. After every kill the
committed slot must load in ONNX Runtime and pass its golden self-test. To keep 100+ cycles cheap,
each agent process is forked from a pre-imported "zygote" process (imports cost ~0.5 s, a fork a few
ms); every cycle is still a separate process with its own memory, killed by the kernel mid-flight.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.device_agent.e2e_support import REPO_ROOT, Fleet, agent_cli, agent_env
from tests.device_agent.helpers import assert_one_committed_loadable

CYCLES = 100

ZYGOTE = r"""
import os, sys
import numpy, onnxruntime, httpx, tuf.ngclient  # noqa: F401  (imported once, before any fork)
from device_agent import cli, agent, daemon, updater  # noqa: F401
from bundles.tuf import client  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os._exit(cli.main(["run", "--once", "--no-http"]))
    print(f"pid {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"exit {status}", flush=True)
"""


def committed_version(state_dir: Path) -> int:
    """The committed slot's version, after checking it loads and passes its self-test."""
    from bundles.predictor import Predictor
    from device_agent.slots import ModelSlots

    slots = ModelSlots(state_dir / "models", "tiny")
    committed = slots.pointer().committed
    assert committed is not None, "the device has no committed model"
    info = slots.info(committed)
    assert info is not None, f"committed slot {committed} holds no verified bundle"
    with Predictor.load(slots.manifest(committed), slots.slot_dir(committed), variant=info.variant) as predictor:
        predictor.self_test()
    return info.version


class Zygote:
    def __init__(self, state_dir: Path, log_path: Path) -> None:
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            env=agent_env(state_dir),
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def start(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return int(self._line().split()[1])

    def wait(self) -> int:
        return int(self._line().split()[1])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)
        self.log.close()


def test_kill_9_at_random_moments_never_leaves_the_device_without_a_working_model(tmp_path: Path) -> None:
    seed = int(os.environ.get("EDGEFLEET_KILL9_SEED", "20261129"))
    rng = random.Random(seed)
    fleet = Fleet(tmp_path / "fleet")
    state_dir = tmp_path / "device"
    try:
        for version, bad in ((1, False), (2, False), (3, True)):
            fleet.publish("tiny", version, bad_golden=bad)
        enrolled = agent_cli(state_dir, "enroll", "--server", fleet.url, "--token", fleet.enroll_token())
        assert enrolled.returncode == 0, enrolled.stderr
        device_id = (state_dir / "identity" / "enrollment.json").read_text().split('"device_id": "')[1].split('"')[0]
        fleet.assign(device_id, "tiny", 1)
        zygote = Zygote(state_dir, tmp_path / "agent.log")
        zygote.start()
        assert zygote.wait() == 0
        assert committed_version(state_dir) == 1
        fleet.assign(device_id, "tiny", 2)
        start = time.monotonic()
        zygote.start()
        assert zygote.wait() == 0
        round_s = time.monotonic() - start  # one whole update round: the window kills are drawn over
        assert committed_version(state_dir) == 2

        killed, versions_seen = 0, set()
        for cycle in range(CYCLES):
            fleet.assign(device_id, "tiny", (1, 3, 2)[cycle % 3])
            pid = zygote.start()
            time.sleep(rng.uniform(0.0, 1.2 * round_s))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            status = zygote.wait()
            killed += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            versions_seen.add(committed_version(state_dir))  # the invariant, after every single kill

        zygote.start()  # one last round without a kill: it finishes whatever was interrupted
        assert zygote.wait() == 0
        zygote.close()
        final = assert_one_committed_loadable(state_dir, "tiny")
        assert final in (1, 2)
        assert killed >= CYCLES // 3, f"only {killed} of {CYCLES} processes were killed mid-flight (seed {seed})"
        assert versions_seen >= {1, 2}, f"updates never progressed between kills: {versions_seen} (seed {seed})"
    finally:
        fleet.close()

"""The simulator's parts that need no server: fault streams, profiles, the inference shortcut, sharding the
fleet over simulator processes."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bundles.testing import build_bundle_dir
from simulators.fleet.behaviour import ModelBehaviour
from simulators.fleet.device import Fleet, VirtualDevice
from simulators.fleet.net import Balancer, FaultyStream, LinkStats
from simulators.fleet.profiles import PROFILES, assign_profiles
from simulators.fleet.runner import Workers
from simulators.fleet.scenario import parse_scenario
from simulators.fleet.server import SimulationError
from simulators.fleet.worker import ShardPlan, auto_workers, make_devices


class Chunks(httpx.SyncByteStream):
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    def __iter__(self):
        yield from self.chunks


def test_a_cut_download_delivers_half_its_first_chunk_then_fails_like_a_dropped_connection() -> None:
    stats = LinkStats()
    received = []
    with pytest.raises(httpx.ReadError, match="cut mid-download"):
        for chunk in FaultyStream(Chunks(b"abcdefgh", b"ijkl"), stats, cut=True, corrupt=False):
            received.append(chunk)
    assert received == [b"abcd"] and stats.bytes_down == 4


def test_a_tampered_download_has_one_byte_flipped_and_every_byte_counted() -> None:
    stats = LinkStats()
    body = b"".join(FaultyStream(Chunks(b"\x00bc", b"def"), stats, cut=False, corrupt=True))
    assert body == b"\xffbcdef" and stats.bytes_down == 6


def test_profiles_are_assigned_in_their_shares() -> None:
    profiles = assign_profiles(10, {"pi4": 0.5, "pi5": 0.3, "x86": 0.2})
    assert [p.name for p in profiles].count("pi4") == 5 and len(profiles) == 10
    assert PROFILES["pi4"].transfer_s(5_000_000) > PROFILES["x86"].transfer_s(5_000_000)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return build_bundle_dir(tmp_path_factory.mktemp("bundle"), name="digits", version=1)


def test_a_good_model_answers_with_the_bundles_golden_outputs_through_its_postprocessing(manifest) -> None:
    answer = ModelBehaviour(manifest).answer(random.Random(0), base_latency_ms=2.0)
    assert answer.error is None and 1.6 <= answer.latency_ms <= 2.6
    assert {"logits", "probabilities", "class_index", "label"} <= set(answer.outputs)
    assert np.allclose(answer.outputs["probabilities"].sum(axis=-1), 1.0)


@pytest.mark.parametrize(
    ("behaviour", "check"),
    [
        ("errors", lambda a: a.error is not None and a.outputs is None),
        ("nan", lambda a: np.isnan(a.outputs["logits"]).all()),
        ("slow", lambda a: a.latency_ms >= 2.0 * 20 * 0.8),
        ("drift_inputs", lambda a: float(a.inputs["x"].min()) > 3.0),
        ("drift_predictions", lambda a: set(a.outputs["class_index"].ravel().tolist()) == {2}),
    ],
)
def test_a_bad_model_misbehaves_as_its_behaviour_says(manifest, behaviour, check) -> None:
    answer = ModelBehaviour(manifest, behaviour, rate=1.0).answer(random.Random(0), base_latency_ms=2.0)
    assert check(answer)


def _plan(tmp_path: Path, shard: int, shards: int, devices: int = 12) -> ShardPlan:
    scenario = parse_scenario({
        "fleet": {"devices": devices, "profiles": {"pi4": 0.5, "x86": 0.5}, "concurrency": 2},
        "faults": {"slow_link_share": 0.3, "clock_skew_share": 0.3, "clock_skew_s": 60, "offline_share": 0.3},
        "bundles": [{"version": 1}],
    })  # fmt: skip
    return ShardPlan(scenario, shard, shards, "http://127.0.0.1:9", (9,), "token", tmp_path)


def _identity(device: VirtualDevice) -> tuple[object, ...]:
    return (device.index, device.profile.name, device.faults, device.dir, device.rng.random())


def test_a_device_is_the_same_whatever_the_number_of_simulator_processes(tmp_path: Path) -> None:
    def devices(shard: int, shards: int) -> list[VirtualDevice]:
        plan = _plan(tmp_path, shard, shards)
        return make_devices(plan, Fleet(plan.url, plan.token, Balancer(plan.ports), tmp_path, {}, 0.0))

    alone = [_identity(d) for d in devices(0, 1)]
    sharded = [_identity(d) for shard in range(3) for d in devices(shard, 3)]
    assert sorted(sharded, key=lambda x: x[0]) == alone
    assert [d.index for d in devices(1, 3)] == [1, 4, 7, 10]  # interleaved: each shard gets the same mix


def test_the_default_number_of_simulator_processes_follows_the_fleet_and_the_cores() -> None:
    assert auto_workers(40, cores=2) == 1
    assert auto_workers(10_000, cores=2) == 2
    assert auto_workers(10_000, cores=16) == 4
    assert auto_workers(100_000, cores=16) == 16


def test_a_simulator_process_that_dies_is_reported_by_name_not_waited_for(tmp_path: Path) -> None:
    workers = Workers([_plan(tmp_path, 0, 2), _plan(tmp_path, 1, 2)])
    try:
        deadline = time.monotonic() + 120
        while not workers.ready() and time.monotonic() < deadline:
            workers.pump()
            time.sleep(0.1)
        assert workers.fleet().devices == 12
        os.kill(workers.processes[1].pid, signal.SIGKILL)
        workers.processes[1].join(timeout=10)
        died = r"simulator worker 1 \(pid \d+\) died with exit code -9; its 6 devices stopped"
        with pytest.raises(SimulationError, match=died):
            workers.pump()
    finally:
        started = time.monotonic()
        totals = workers.stop(timeout_s=30)
    assert time.monotonic() - started < 30 and totals.counts["polls"] == 0  # the live worker still reported

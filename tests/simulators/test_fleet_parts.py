"""The simulator's parts that need no server: fault streams, profiles, the inference shortcut."""

from __future__ import annotations

import random

import httpx
import numpy as np
import pytest

from bundles.testing import build_bundle_dir
from simulators.fleet.behaviour import ModelBehaviour
from simulators.fleet.net import FaultyStream, LinkStats
from simulators.fleet.profiles import PROFILES, assign_profiles


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

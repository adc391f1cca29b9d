"""Target sets: groups, saved filters, ad-hoc filters, devices, all; and who is in or out, with why."""

from __future__ import annotations

import pytest

from bundles.errors import ConfigError
from fleet_server.db import session_scope
from fleet_server.errors import NotFoundError
from fleet_server.models import Device, DeviceTag, SavedFilter
from fleet_server.rollouts.targets import load_manifest, place_devices, resolve_targets
from tests.fleet_server.rollouts.fleetsim import CAPS


@pytest.fixture
def devices(fleet, factory):
    lab = fleet.add_devices(3, group="lab")
    kiosks = fleet.add_devices(2, group="kiosks", caps={**CAPS, "memory_mb": 256})
    pending = fleet.add_devices(1, group="kiosks", status="pending")
    with session_scope(factory) as session:
        session.add(DeviceTag(device_id=lab[0], tag="canary"))
        session.get(Device, kiosks[0]).hw_class = "jetson"
        session.add(SavedFilter(name="small", expression="memory_mb<512"))
    return {"lab": lab, "kiosks": kiosks, "pending": pending}


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["group:lab"], "lab"),
        (["filter:small"], "kiosks"),
        (["where:tag=canary"], "lab[0]"),
        (["where:hw=jetson"], "kiosks[0]"),
        (["group:lab", "group:kiosks"], "lab+kiosks+pending"),
        (["all"], "lab+kiosks+pending"),
    ],
)
def test_target_tokens_name_devices(factory, devices, tokens, expected):
    everyone = devices["lab"] + devices["kiosks"] + devices["pending"]
    names = {"lab": devices["lab"], "kiosks": devices["kiosks"], "lab[0]": devices["lab"][:1],
             "kiosks[0]": devices["kiosks"][:1], "lab+kiosks+pending": everyone}  # fmt: skip
    with factory() as session:
        assert resolve_targets(session, tokens) == sorted(names[expected])


def test_a_bare_id_and_device_prefix_are_the_same(factory, devices):
    device_id = devices["lab"][1]
    with factory() as session:
        assert resolve_targets(session, [device_id]) == resolve_targets(session, [f"device:{device_id}"]) == [device_id]


@pytest.mark.parametrize(
    ("tokens", "error", "message"),
    [
        (["group:none"], NotFoundError, "device group 'none' does not exist"),
        (["filter:none"], NotFoundError, "saved filter 'none' does not exist"),
        (["device:ghost"], NotFoundError, "device ghost does not exist"),
        (["shelf:3"], ConfigError, "use all, group:NAME"),
        ([], ConfigError, "give at least one target"),
    ],
)
def test_bad_targets_are_named(factory, devices, tokens, error, message):
    with factory() as session, pytest.raises(error, match=message):
        resolve_targets(session, tokens)


def test_every_named_device_is_placed_with_a_reason(factory, devices):
    with factory() as session:
        manifest = load_manifest(session, "digits", 2)
        placements = {p.device_id: p for p in place_devices(session, manifest, resolve_targets(session, ["all"]))}
    assert all(placements[d].membership == "member" and placements[d].variant == "onnx-fp32" for d in devices["lab"])
    assert placements[devices["pending"][0]].membership == "excluded"
    assert placements[devices["pending"][0]].reason == "device is pending, not accepted"
    assert len(placements) == 6


def test_a_rollouts_variant_preferences_rank_first_but_never_make_a_variant_eligible():
    from bundles.manifest import ValidatedRuntime
    from fleet_server.rollouts.targets import place_on_capabilities
    from tests.bundles.test_selection import manifest_of, variant

    manifest = manifest_of(
        variant("onnx-fp32", size_bytes=150_000, min_runtime_version="1.20"),
        variant("tflite-int8-dynamic", "tflite", "int8-dynamic", 45_000, runtime="litert",
                validated_runtimes=(ValidatedRuntime("litert", "2.3.0"),)),
    )  # fmt: skip
    both = {"arch": "x86_64", "os": "linux", "runtimes": {"onnxruntime": "1.32.0", "litert": "2.3.0"}}
    assert place_on_capabilities("d", both, manifest).variant == "tflite-int8-dynamic"  # the smaller one
    assert place_on_capabilities("d", both, manifest, ("onnx",)).variant == "onnx-fp32"
    only_onnx = {**both, "runtimes": {"onnxruntime": "1.32.0"}}
    assert place_on_capabilities("d", only_onnx, manifest, ("tflite",)).variant == "onnx-fp32"
    old_runtime = {**both, "runtimes": {"tflite_runtime": "2.14.0"}}
    placed = place_on_capabilities("d", old_runtime, manifest, ("tflite",))
    assert placed.membership == "incompatible"
    assert (
        "tflite-int8-dynamic: validated only on litert 2.3.0 (this device has tflite_runtime 2.14.0)" in placed.reason
    )

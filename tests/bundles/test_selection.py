"""Variant selection: the best compatible variant, or every reason each variant was rejected."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform

import pytest

from bundles.errors import ConfigError, ManifestError, NoCompatibleVariantError
from bundles.manifest import FileRef, Manifest, Requirements, TensorSpec, ValidatedRuntime, Variant
from bundles.selection import (
    DeviceCapabilities,
    compatible_variants,
    hw_class_from_model,
    normalize_arch,
    probe_capabilities,
    rejection_reasons,
    same_release_series,
    select_variant,
    usable_runtimes,
    validated_runtime_for,
    version_at_least,
)

SHA = "a" * 64


def variant(
    vid: str,
    target: str = "onnx",
    precision: str = "fp32",
    size_bytes: int = 1000,
    status: str = "passed",
    **requirements: object,
) -> Variant:
    req = {"runtime": "onnxruntime", "min_runtime_version": "1.16", **requirements}
    return Variant(
        id=vid,
        target=target,
        precision=precision,
        entry=f"{vid}/model",
        files=(FileRef(f"{vid}/model", SHA, size_bytes),),
        requirements=Requirements(**req),  # type: ignore[arg-type]
        status=status,
    )


def manifest_of(*variants: Variant) -> Manifest:
    spec = TensorSpec("x", "float32", (-1, 4))
    return Manifest(name="m", version=3, task="classification", inputs=(spec,), outputs=(spec,), variants=variants)


PI = DeviceCapabilities(
    arch="aarch64",
    os="linux",
    python="3.11.2",
    runtimes={"onnxruntime": "1.20.1", "litert": "2.3.0"},
    accelerators=(),
    memory_mb=2048,
    disk_free_mb=10_000,
)

FLEET = manifest_of(
    variant("onnx-fp32", size_bytes=160_000),
    variant("onnx-int8", precision="int8", size_bytes=50_000),
    variant("ort-fp32", target="ort", size_bytes=158_000),
    variant("tflite-int8", "tflite", "int8", 45_000, runtime="litert", min_runtime_version="2.0"),
    variant("coreml-fp16", "coreml", "fp16", 80_000, "structural", runtime="coreml", os=("darwin",)),
    variant("onnx-cuda", size_bytes=160_000, accelerators=("cuda",)),
)


def test_default_order_prefers_the_smallest_passed_variant() -> None:
    assert select_variant(FLEET, PI).id == "tflite-int8"
    ids = [v.id for v in compatible_variants(FLEET, PI)]
    assert ids == ["tflite-int8", "onnx-int8", "ort-fp32", "onnx-fp32"]


def test_preferences_come_first_in_their_order() -> None:
    by_target = dataclasses.replace(PI, preferences=("ort", "onnx"))
    assert [v.id for v in compatible_variants(FLEET, by_target)][:3] == ["ort-fp32", "onnx-int8", "onnx-fp32"]
    by_pair = dataclasses.replace(PI, preferences=("onnx:fp32",))
    assert select_variant(FLEET, by_pair).id == "onnx-fp32"
    by_id = dataclasses.replace(PI, preferences=("no-such-variant", "onnx-int8"))
    assert select_variant(FLEET, by_id).id == "onnx-int8"


def test_a_variant_using_an_available_accelerator_beats_cpu_variants() -> None:
    jetson = dataclasses.replace(PI, accelerators=("cuda", "tensorrt"))
    assert select_variant(FLEET, jetson).id == "onnx-cuda"


def test_passed_variants_come_before_structural_ones() -> None:
    mac = dataclasses.replace(PI, os="darwin", arch="arm64", runtimes={"coreml": "9.0", "onnxruntime": "1.20"})
    assert normalize_arch("arm64") == "aarch64"
    ids = [v.id for v in compatible_variants(FLEET, mac)]
    assert ids[-1] == "coreml-fp16"
    only_coreml = manifest_of(FLEET.variant("coreml-fp16"))
    assert select_variant(only_coreml, mac).id == "coreml-fp16"


REJECTIONS = [
    ("missing runtime", variant("v", runtime="llama_cpp"), "runtime llama_cpp is not installed"),
    (
        "old runtime",
        variant("v", min_runtime_version="1.21"),
        "runtime onnxruntime 1.20.1 is older than the required 1.21",
    ),
    ("wrong arch", variant("v", arch=("x86_64",)), "arch aarch64 is not one of x86_64"),
    ("wrong os", variant("v", os=("darwin",)), "os linux is not one of darwin"),
    (
        "missing accelerator",
        variant("v", accelerators=("cuda", "tensorrt")),
        "accelerator cuda, tensorrt is not available",
    ),
    ("too little memory", variant("v", min_memory_mb=4096), "2048 MB of memory free, 4096 MB required"),
    ("too little disk", variant("v", size_bytes=20_000 << 20), "10000 MB of disk free, 20000 MB required"),
]


@pytest.mark.parametrize(("case", "candidate", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_each_unmet_requirement_is_a_named_reason(case: str, candidate: Variant, reason: str) -> None:
    assert rejection_reasons(candidate, PI) == [reason]
    with pytest.raises(NoCompatibleVariantError) as excinfo:
        select_variant(manifest_of(candidate), PI)
    assert excinfo.value.reasons == {"v": [reason]}
    assert reason in str(excinfo.value) and "m@3" in str(excinfo.value)


def test_no_compatible_variant_lists_every_variant_and_every_reason() -> None:
    tiny = DeviceCapabilities(arch="armv7l", os="linux", runtimes={"onnxruntime": "1.10"}, memory_mb=256)
    with pytest.raises(NoCompatibleVariantError) as excinfo:
        select_variant(FLEET, tiny)
    reasons = excinfo.value.reasons
    assert set(reasons) == {v.id for v in FLEET.variants}
    assert reasons["onnx-cuda"] == [
        "runtime onnxruntime 1.10 is older than the required 1.16",
        "accelerator cuda is not available",
    ]
    assert reasons["coreml-fp16"] == ["runtime coreml is not installed", "os linux is not one of darwin"]


def test_unknown_memory_and_disk_are_not_held_against_a_variant() -> None:
    unknown = dataclasses.replace(PI, memory_mb=None, disk_free_mb=None)
    assert rejection_reasons(variant("v", min_memory_mb=10**6, size_bytes=10**12), unknown) == []


@pytest.mark.parametrize(
    ("installed", "minimum", "ok"),
    [
        ("1.20.1", "1.20", True),
        ("1.20", "1.20.0", True),
        ("1.9.0", "1.10", False),
        ("1.32.0", "1.16", True),
        ("2.0.0rc1", "2.0", True),
        ("0.3.36", "0.3.30", True),
        ("v1.2", "1.3", False),
        ("1.2.post1", "1.2", True),
        ("anything", "0", True),
    ],
)
def test_versions_compare_numerically(installed: str, minimum: str, ok: bool) -> None:
    assert version_at_least(installed, minimum) is ok


def test_capabilities_round_trip_and_keep_unknown_fields() -> None:
    data = {**PI.to_dict(), "x-board": "pi4", "preferences": ["tflite"]}
    caps = DeviceCapabilities.from_dict(data)
    assert caps.extra == {"x-board": "pi4"}
    assert caps.preferences == ("tflite",)
    assert caps.to_dict() == data
    assert DeviceCapabilities.from_dict({"arch": "AMD64", "os": "Linux"}).arch == "x86_64"


@pytest.mark.parametrize(
    "bad",
    [{"os": "linux"}, {"arch": "x86_64", "os": "linux", "runtimes": []}, {"arch": "a", "os": "b", "memory_mb": "x"}],
)
def test_malformed_capabilities_are_a_config_error(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="capabilities"):
        DeviceCapabilities.from_dict(bad)


def test_probe_capabilities_describes_this_host(tmp_path: object) -> None:
    caps = probe_capabilities(str(tmp_path))
    assert caps.arch == normalize_arch(platform.machine())
    assert caps.os == platform.system().lower()
    assert caps.python == platform.python_version()
    assert caps.runtimes["onnxruntime"] == importlib.metadata.version("onnxruntime")
    assert "coreml" not in caps.runtimes or caps.os == "darwin"
    assert caps.memory_mb is not None and caps.memory_mb > 0
    assert caps.disk_free_mb is not None and caps.disk_free_mb > 0
    assert DeviceCapabilities.from_dict(caps.to_dict()) == caps


def test_accelerators_are_read_from_onnxruntime_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's provider list is the hardware probe; this host has no GPU, so it is stubbed."""
    import onnxruntime

    from bundles import selection

    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    assert {"cuda", "tensorrt"} <= set(selection.probe_accelerators())
    assert "azure" not in selection.probe_accelerators()


def test_onnxruntime_uses_requested_accelerators_it_has_then_cpu() -> None:
    from bundles.runtimes.onnxruntime import _providers

    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _providers(available, ("tensorrt", "cuda")) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _providers(available, ()) == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("model", "hw_class"),
    [
        ("Raspberry Pi 4 Model B Rev 1.4", "pi4"),
        ("Raspberry Pi 5 Model B Rev 1.0", "pi5"),
        ("Raspberry Pi Zero 2 W Rev 1.0", "pizero2"),
        ("Raspberry Pi Compute Module 4 Rev 1.1", "picm4"),
        ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano"),
        ("NVIDIA Jetson Xavier NX Developer Kit", "jetson-xavier-nx"),
        ("Pine64 RockPro64 v2.1", "pine64-rockpro64-v2-1"),
    ],
)
def test_hw_class_is_derived_from_the_device_tree_model(model: str, hw_class: str) -> None:
    assert hw_class_from_model(model) == hw_class


def test_this_host_reports_a_hw_class_and_it_survives_a_round_trip() -> None:
    caps = probe_capabilities()
    assert caps.hw_class  # linux-x86_64 here, pi4 on a Raspberry Pi 4
    assert DeviceCapabilities.from_dict(caps.to_dict()).hw_class == caps.hw_class


# --- runtimes a variant was validated on -----------------------------------------------------------

BOTH = (ValidatedRuntime("litert", "2.3.0"), ValidatedRuntime("tflite_runtime", "2.14.0"))
LITERT_ONLY = (ValidatedRuntime("litert", "2.3.0"),)
VALIDATED = manifest_of(
    variant("tflite-int8-weight", "tflite", "int8-weight", 46_000, runtime="litert", validated_runtimes=BOTH),
    variant("tflite-int8-dynamic", "tflite", "int8-dynamic", 44_000, runtime="litert", validated_runtimes=LITERT_ONLY),
)


def _device(**runtimes: str) -> DeviceCapabilities:
    return DeviceCapabilities(arch="aarch64", os="linux", runtimes=dict(runtimes))


def test_a_variant_runs_only_on_a_runtime_it_was_validated_on() -> None:
    old = _device(tflite_runtime="2.14.0")
    assert select_variant(VALIDATED, old).id == "tflite-int8-weight"
    assert validated_runtime_for(VALIDATED.variant("tflite-int8-weight"), old) == "tflite_runtime"
    assert rejection_reasons(VALIDATED.variant("tflite-int8-dynamic"), old) == [
        "validated only on litert 2.3.0 (this device has tflite_runtime 2.14.0)"
    ]


def test_a_patch_release_of_the_validated_series_fits_another_series_does_not() -> None:
    dynamic = VALIDATED.variant("tflite-int8-dynamic")
    assert usable_runtimes(dynamic, _device(litert="2.3.1")) == ["litert"]
    assert usable_runtimes(dynamic, _device(litert="2.4.0")) == []
    assert usable_runtimes(dynamic, _device(litert="2.2.9")) == []
    assert same_release_series("2.14.0", "2.14") and not same_release_series("2.14.0", "")


def test_the_first_validated_runtime_is_used_unless_the_device_prefers_another() -> None:
    weight = VALIDATED.variant("tflite-int8-weight")
    both = _device(litert="2.3.0", tflite_runtime="2.14.0")
    assert validated_runtime_for(weight, both) == "litert"
    assert validated_runtime_for(weight, both.with_preferences(("tflite_runtime",))) == "tflite_runtime"


def test_a_rollouts_preferences_rank_before_the_devices_own() -> None:
    caps = dataclasses.replace(PI, preferences=("onnx",))
    assert select_variant(FLEET, caps).target == "onnx"
    assert select_variant(FLEET, caps.with_preferences(("tflite",))).id == "tflite-int8"
    assert caps.with_preferences(("tflite", "onnx")).preferences == ("tflite", "onnx")


def test_a_core_ml_variant_needs_macos_at_its_deployment_target() -> None:
    coreml = variant("coreml-fp16", "coreml", "fp16", runtime="coreml", os=("darwin",), deployment_target="macOS13")
    mac = DeviceCapabilities(arch="aarch64", os="darwin", runtimes={"coreml": "9.0"}, os_version="12.7.1")
    assert rejection_reasons(coreml, mac) == ["needs macOS13 or later, this device runs macOS 12.7.1"]
    assert rejection_reasons(coreml, dataclasses.replace(mac, os_version="14.2")) == []
    assert rejection_reasons(coreml, dataclasses.replace(mac, os_version="")) == []  # unknown: not held against it
    assert rejection_reasons(coreml, PI) == ["runtime coreml is not installed", "os linux is not one of darwin"]


def test_validated_runtimes_and_the_deployment_target_round_trip_and_are_checked() -> None:
    entry = VALIDATED.variant("tflite-int8-weight").to_dict()
    assert entry["requirements"]["validated_runtimes"] == [
        {"runtime": "litert", "version": "2.3.0"}, {"runtime": "tflite_runtime", "version": "2.14.0"},
    ]  # fmt: skip
    assert Variant.from_dict(entry) == VALIDATED.variant("tflite-int8-weight")
    plain = variant("onnx-fp32").to_dict()["requirements"]
    assert "validated_runtimes" not in plain and "deployment_target" not in plain  # older bundles keep their bytes
    with pytest.raises(ManifestError, match="deployment_target: 'Mojave' is not like 'macOS13'"):
        Requirements.from_dict({"runtime": "coreml", "deployment_target": "Mojave"})
    with pytest.raises(ManifestError, match=r"validated_runtimes\[0\]: missing required field 'version'"):
        Requirements.from_dict({"runtime": "litert", "validated_runtimes": [{"runtime": "litert"}]})
    caps = DeviceCapabilities.from_dict({"arch": "arm64", "os": "Darwin", "os_version": "14.1"})
    assert caps.os_version == "14.1" and caps.to_dict()["os_version"] == "14.1"

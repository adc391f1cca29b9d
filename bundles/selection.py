"""Variant selection: which variant of a bundle should this device run?

A device describes itself as :class:`DeviceCapabilities` (arch, OS, installed runtimes and their
versions, accelerators, free memory and disk, preferences); :func:`probe_capabilities` measures the
running host. :func:`select_variant` keeps the variants whose requirements the device meets and
picks the best; when none fits it raises :class:`NoCompatibleVariantError` listing, per variant,
every reason it was rejected, so an operator sees at once what a device lacks.

A variant fits when the device has a runtime that may run it (:func:`usable_runtimes`: one of its
``validated_runtimes`` at the same release series, or else its ``runtime`` at the minimum
version), its arch, OS and deployment target, accelerators, memory and disk.

Ranking (best first): the device's ``preferences`` (targets, precisions, ``target:precision``,
variant ids or runtime names, earliest wins; a rollout's preferences come before the device's
own, :meth:`DeviceCapabilities.with_preferences`); then ``passed`` before ``structural``; then
variants that use an accelerator the device has; then smaller variants (a quantised variant is
only published when it met its accuracy and latency gates, so smaller is better); then the variant
id for a stable order. :func:`validated_runtime_for` names the runtime the chosen variant runs on.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from bundles.errors import ConfigError, NoCompatibleVariantError
from bundles.manifest import Manifest, Requirements, Variant

_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "aarch64",
    "armv8l": "aarch64",
    "armv7": "armv7l",
    "i686": "x86",
    "i386": "x86",
}
RUNTIME_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
    "litert": ("ai-edge-litert",),
    "tflite_runtime": ("tflite-runtime",),
    "llama_cpp": ("llama-cpp-python",),
    "coreml": ("coremltools",),
}
"""Runtime name used in ``Requirements.runtime`` -> the pip distributions that provide it."""
_ORT_PROVIDER_ACCELERATORS = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt",
    "ROCMExecutionProvider": "rocm",
    "OpenVINOExecutionProvider": "openvino",
    "CoreMLExecutionProvider": "coreml",
    "DmlExecutionProvider": "directml",
}
_DEVICE_FILE_ACCELERATORS = {"/dev/nvidia0": "nvidia-gpu", "/dev/nvhost-ctrl": "nvidia-gpu", "/dev/apex_0": "edgetpu"}


def normalize_arch(machine: str) -> str:
    """``platform.machine()`` spellings folded to one name per architecture (x86_64, aarch64, ...)."""
    lowered = machine.strip().lower()
    return _ARCH_ALIASES.get(lowered, lowered)


@dataclass(frozen=True)
class DeviceCapabilities:
    """What a device can run. ``memory_mb``/``disk_free_mb`` of ``None`` mean unknown (not checked)."""

    arch: str
    os: str
    python: str = ""
    runtimes: dict[str, str] = field(default_factory=dict)
    accelerators: tuple[str, ...] = ()
    memory_mb: int | None = None
    disk_free_mb: int | None = None
    preferences: tuple[str, ...] = ()
    hw_class: str = ""
    os_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = (
        "arch", "os", "python", "runtimes", "accelerators", "memory_mb", "disk_free_mb", "preferences", "hw_class",
        "os_version",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceCapabilities:
        """Parse capabilities sent by a device (:class:`ConfigError` if malformed); unknown keys go to ``extra``."""
        if not isinstance(data, Mapping) or not all(isinstance(data.get(k), str) for k in ("arch", "os")):
            raise ConfigError("capabilities: 'arch' and 'os' are required strings")
        runtimes = data.get("runtimes")
        runtimes = {} if runtimes is None else runtimes
        if not isinstance(runtimes, Mapping):
            raise ConfigError("capabilities.runtimes: expected an object of runtime -> version")
        return cls(
            arch=normalize_arch(data["arch"]),
            os=str(data["os"]).lower(),
            python=str(data.get("python") or ""),
            runtimes={str(k): str(v) for k, v in runtimes.items()},
            accelerators=_strings(data, "accelerators"),
            memory_mb=_optional_int(data, "memory_mb"),
            disk_free_mb=_optional_int(data, "disk_free_mb"),
            preferences=_strings(data, "preferences"),
            hw_class=str(data.get("hw_class") or ""),
            os_version=str(data.get("os_version") or ""),
            extra={k: v for k, v in data.items() if k not in cls.KNOWN},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "arch": self.arch,
            "os": self.os,
            "python": self.python,
            "runtimes": dict(self.runtimes),
            "accelerators": list(self.accelerators),
            "memory_mb": self.memory_mb,
            "disk_free_mb": self.disk_free_mb,
            "preferences": list(self.preferences),
            "hw_class": self.hw_class,
        }
        if self.os_version:
            out["os_version"] = self.os_version
        return {**self.extra, **out}

    def with_preferences(self, preferences: tuple[str, ...]) -> DeviceCapabilities:
        """The same device with ``preferences`` ranked before its own (a rollout's override)."""
        merged = tuple(dict.fromkeys((*preferences, *self.preferences)))
        return replace(self, preferences=merged)


def _strings(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"capabilities.{key}: expected a list of strings, got {type(value).__name__}")
    return tuple(str(v) for v in value)


MAX_MB = 2**31 - 1
"""The largest memory or disk size a device may report, in MB (a 32-bit column; two petabytes)."""


def _optional_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"capabilities.{key}: expected a number, got {type(value).__name__}")
    if not (math.isfinite(value) and 0 <= value <= MAX_MB):
        raise ConfigError(f"capabilities.{key}: {value!r} is not a number of MB in [0, {MAX_MB}]")
    return int(value)


# --- probing the running host --------------------------------------------------------------------


def probe_capabilities(data_dir: str | Path = ".", preferences: tuple[str, ...] = ()) -> DeviceCapabilities:
    """Measure this host: arch, OS, Python, installed runtimes, accelerators, memory, free disk.

    ``data_dir`` is where bundles will be stored (its file system's free space is reported).
    """
    os_name = platform.system().lower()
    return DeviceCapabilities(
        arch=normalize_arch(platform.machine()),
        os=os_name,
        python=platform.python_version(),
        runtimes=installed_runtimes(os_name),
        accelerators=probe_accelerators(),
        memory_mb=available_memory_mb(),
        disk_free_mb=_disk_free_mb(Path(data_dir)),
        preferences=preferences,
        hw_class=probe_hw_class(os_name),
        os_version=probe_os_version(os_name),
    )


def probe_os_version(os_name: str) -> str:
    """The OS release a deployment target is compared with: macOS's product version, else the kernel's."""
    if os_name == "darwin":
        return platform.mac_ver()[0]
    return platform.release()


_DEVICE_TREE_MODELS = ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model")


def probe_hw_class(os_name: str | None = None) -> str:
    """A short hardware class that fleet filters match (``hw=pi4``): from the device tree, else OS and arch."""
    os_name = os_name or platform.system().lower()
    for path in _DEVICE_TREE_MODELS:
        try:
            model = Path(path).read_bytes().rstrip(b"\0").decode("utf-8", "replace")
        except OSError:
            continue
        if model.strip():
            return hw_class_from_model(model)
    prefix = "mac" if os_name == "darwin" else os_name
    return f"{prefix}-{normalize_arch(platform.machine())}"


def hw_class_from_model(model: str) -> str:
    """The device-tree model string as a short class.

    ``Raspberry Pi 4 Model B Rev 1.4`` -> ``pi4``; ``NVIDIA Jetson Orin Nano Developer Kit`` -> ``jetson-orin-nano``.
    """
    text = model.strip().lower()
    pi = re.match(r"raspberry pi (\d+|zero 2|zero|compute module \d+)", text)
    if pi:
        return "pi" + pi.group(1).replace("compute module ", "cm").replace(" ", "")
    jetson = re.match(r"(?:nvidia )?jetson ([a-z0-9 -]+?)(?: developer kit| engineering reference|$)", text)
    if jetson:
        return "jetson-" + re.sub(r"[^a-z0-9]+", "-", jetson.group(1)).strip("-")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40]


def installed_runtimes(os_name: str | None = None) -> dict[str, str]:
    """Runtime name -> installed version, from package metadata (no runtime is imported)."""
    os_name = os_name or platform.system().lower()
    found: dict[str, str] = {}
    for runtime, dists in RUNTIME_DISTRIBUTIONS.items():
        if runtime == "coreml" and os_name != "darwin":
            continue  # coremltools converts anywhere but predicts only on macOS
        version = _first_installed(dists)
        if version is not None:
            found[runtime] = version
    return found


def _first_installed(dists: tuple[str, ...]) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def probe_accelerators() -> tuple[str, ...]:
    """Accelerators seen through ONNX Runtime's providers and well-known device files."""
    found = {name for path, name in _DEVICE_FILE_ACCELERATORS.items() if os.path.exists(path)}
    found.update(_ort_accelerators())
    if glob.glob("/dev/nvhost-*"):
        found.add("nvidia-gpu")
    return tuple(sorted(found))


def _ort_accelerators() -> set[str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return set()
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except Exception:  # a broken runtime install must not stop the agent from reporting the rest
        return set()
    return {_ORT_PROVIDER_ACCELERATORS[p] for p in providers if p in _ORT_PROVIDER_ACCELERATORS}


def available_memory_mb() -> int | None:
    """Memory available to new processes (MemAvailable on Linux), in MiB; None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        page_bytes = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return int(pages * page_bytes) // (1 << 20)


def _disk_free_mb(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path if path.exists() else Path.cwd()).free // (1 << 20)
    except OSError:
        return None


# --- selecting -----------------------------------------------------------------------------------


def version_tuple(version: str) -> tuple[int, ...]:
    """Numeric release parts of a version string: ``"1.20.1rc1"`` -> ``(1, 20, 1)``."""
    parts: list[int] = []
    for piece in version.strip().lstrip("vV").split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def version_at_least(installed: str, minimum: str) -> bool:
    """``installed >= minimum`` comparing numeric release parts (``1.20`` == ``1.20.0``)."""
    have, need = version_tuple(installed), version_tuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def same_release_series(installed: str, validated: str) -> bool:
    """``installed`` is of the release series (major.minor) ``validated`` names: ``2.3.1`` fits ``2.3.0``."""
    return version_tuple(installed)[:2] == version_tuple(validated)[:2] and bool(version_tuple(validated))


def usable_runtimes(variant: Variant, caps: DeviceCapabilities) -> list[str]:
    """The runtimes of ``caps`` that may run ``variant``, in the variant's order of preference.

    A variant that lists ``validated_runtimes`` runs only on one of them, at a version of the same
    release series as the one it was validated on (a patch release keeps the kernels; another
    series may load the model and compute something else, as tflite-runtime 2.14 does with
    ai-edge-quantizer's dynamic-range int8). Otherwise the variant's ``runtime`` at
    ``min_runtime_version`` or later.
    """
    req = variant.requirements
    if req.validated_runtimes:
        return [
            v.runtime
            for v in req.validated_runtimes
            if v.runtime in caps.runtimes and same_release_series(caps.runtimes[v.runtime], v.version)
        ]
    installed = caps.runtimes.get(req.runtime)
    return [req.runtime] if installed is not None and version_at_least(installed, req.min_runtime_version) else []


def validated_runtime_for(variant: Variant, caps: DeviceCapabilities) -> str | None:
    """The runtime ``caps`` should run ``variant`` on (the variant's first usable one), or None."""
    usable = usable_runtimes(variant, caps)
    preferred = [r for r in caps.preferences if r in usable]
    return preferred[0] if preferred else (usable[0] if usable else None)


def _runtime_reasons(variant: Variant, caps: DeviceCapabilities) -> list[str]:
    req = variant.requirements
    if usable_runtimes(variant, caps):
        return []
    if req.validated_runtimes:
        validated = ", ".join(v.describe() for v in req.validated_runtimes)
        installed = ", ".join(f"{name} {version}" for name, version in sorted(caps.runtimes.items())) or "none"
        return [f"validated only on {validated} (this device has {installed})"]
    installed_version = caps.runtimes.get(req.runtime)
    if installed_version is None:
        return [f"runtime {req.runtime} is not installed"]
    return [f"runtime {req.runtime} {installed_version} is older than the required {req.min_runtime_version}"]


def _deployment_target_reasons(req: Requirements, caps: DeviceCapabilities) -> list[str]:
    """A ``macOS13`` target needs macOS 13 or later (unknown OS versions are not held against a variant)."""
    match = re.match(r"macOS(\d+(?:\.\d+)*)$", req.deployment_target)
    if match is None or caps.os != "darwin" or not caps.os_version:
        return []
    if version_at_least(caps.os_version, match.group(1)):
        return []
    return [f"needs {req.deployment_target} or later, this device runs macOS {caps.os_version}"]


def rejection_reasons(variant: Variant, caps: DeviceCapabilities) -> list[str]:
    """Every reason ``variant`` cannot run on ``caps``; empty when it can."""
    req = variant.requirements
    reasons = _runtime_reasons(variant, caps)
    if req.arch and caps.arch not in {normalize_arch(a) for a in req.arch}:
        reasons.append(f"arch {caps.arch} is not one of {', '.join(req.arch)}")
    if req.os and caps.os not in {o.lower() for o in req.os}:
        reasons.append(f"os {caps.os} is not one of {', '.join(req.os)}")
    reasons.extend(_deployment_target_reasons(req, caps))
    missing = [a for a in req.accelerators if a not in caps.accelerators]
    if missing:
        reasons.append(f"accelerator {', '.join(missing)} is not available")
    if caps.memory_mb is not None and caps.memory_mb < req.min_memory_mb:
        reasons.append(f"{caps.memory_mb} MB of memory free, {req.min_memory_mb} MB required")
    size_mb = -(-variant.size_bytes // (1 << 20))
    if caps.disk_free_mb is not None and caps.disk_free_mb < size_mb:
        reasons.append(f"{caps.disk_free_mb} MB of disk free, {size_mb} MB required")
    return reasons


def _preference_rank(variant: Variant, caps: DeviceCapabilities) -> int:
    keys = {variant.id, variant.target, variant.precision, f"{variant.target}:{variant.precision}"}
    keys.update(usable_runtimes(variant, caps))
    for rank, preference in enumerate(caps.preferences):
        if preference in keys:
            return rank
    return len(caps.preferences)


def _rank_key(variant: Variant, caps: DeviceCapabilities) -> tuple[int, int, int, int, str]:
    return (
        _preference_rank(variant, caps),
        0 if variant.status == "passed" else 1,
        -len(variant.requirements.accelerators),
        variant.size_bytes,
        variant.id,
    )


def compatible_variants(manifest: Manifest, caps: DeviceCapabilities) -> list[Variant]:
    """The variants that can run on ``caps``, best first."""
    fitting = [v for v in manifest.variants if not rejection_reasons(v, caps)]
    return sorted(fitting, key=lambda v: _rank_key(v, caps))


def select_variant(manifest: Manifest, caps: DeviceCapabilities) -> Variant:
    """The best variant for ``caps``; :class:`NoCompatibleVariantError` with per-variant reasons if none."""
    ranked = compatible_variants(manifest, caps)
    if ranked:
        return ranked[0]
    reasons = {v.id: rejection_reasons(v, caps) for v in manifest.variants}
    detail = "; ".join(f"{vid}: {', '.join(why)}" for vid, why in reasons.items())
    raise NoCompatibleVariantError(f"{manifest.ref}: no variant can run on this device ({detail})", reasons)


__all__ = [
    "RUNTIME_DISTRIBUTIONS",
    "DeviceCapabilities",
    "available_memory_mb",
    "compatible_variants",
    "installed_runtimes",
    "normalize_arch",
    "probe_accelerators",
    "probe_capabilities",
    "probe_os_version",
    "rejection_reasons",
    "same_release_series",
    "select_variant",
    "usable_runtimes",
    "validated_runtime_for",
    "version_at_least",
    "version_tuple",
]

"""Exporters: one module per deployment target (``converter/exporters/<target>.py``), found by name.

Each module provides:

- ``TARGET``, ``RUNTIME`` (the ``Requirements.runtime`` devices need) and ``RUNTIMES``: every
  runtime the variants are gated on, the primary first (``tflite``: ``litert`` and the old
  ``tflite_runtime``);
- ``PRECISIONS``: the precisions it can build, in ladder order (most aggressive first), and
  ``EXTRA_PRECISIONS``: recipes built only when asked for by name;
- ``build(ctx, precision, out_dir) -> BuiltVariant``: write the variant's files into ``out_dir``;
  a source the target cannot take, or a model its converter cannot lower, is a ConversionError
  with the converter's reason (the target is refused, the other targets go on);
- ``open_runner(variant, runtime, ctx) -> Runner``: the variant loaded in that runtime; a runtime
  this host cannot run (Core ML off macOS, a missing tflite-runtime environment) raises
  RuntimeUnavailableError with the reason;
- ``runtime_version(runtime, ctx) -> str``: the version the gates ran on (it goes into the
  variant's ``validated_runtimes`` when ``VALIDATED_RUNTIMES_BIND`` is true);
- optionally ``check_structure(variant, ctx, parent) -> (metrics, reasons)``: what can be validated
  without executing; a variant no runtime of this host can execute is then ``structural``
  ("structurally valid, not executed on this host"), never "passed".

``gguf`` is the target of language models only (:mod:`converter.llm`, registered with
``register-llm``): asked of any other model it is refused with one line saying so. Adding a target
means adding a module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from bundles.errors import ConfigError, ConversionError
from bundles.manifest import TARGETS, Requirements

if TYPE_CHECKING:
    from converter.spec import ModelSpec


@dataclass
class BuiltVariant:
    """A variant's files on disk, before gating."""

    target: str
    precision: str
    directory: Path
    entry: str
    files: list[str]
    requirements: Requirements
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.target}-{self.precision}"

    @property
    def entry_path(self) -> Path:
        return self.directory / self.entry

    @property
    def size_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files)


class Runner(Protocol):
    """A variant loaded in its runtime."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def torch_module(ctx: Any, target: str) -> Any:
    """The source's ``nn.Module``, or the refusal of a source kind that cannot reach ``target``."""
    module = getattr(ctx.source, "module", None)
    if ctx.source.kind != "torch" or module is None:
        raise ConversionError(
            f"a {ctx.source.kind} source cannot reach {target}: its converter takes PyTorch modules only "
            f"(the onnx and ort targets take every source)"
        )
    return module


def example_inputs(spec: ModelSpec, batch: int) -> dict[str, np.ndarray]:
    """Zero inputs: the batch at ``batch`` (within its range), other dynamic dims at their lowest."""
    from bundles.tensors import numpy_dtype

    out = {}
    for tensor in spec.inputs:
        shape = []
        for index, dim in enumerate(tensor.shape):
            low, high = tensor.dim_ranges.get(str(index), (1, 1))
            wanted = batch if index == 0 else low
            shape.append(dim if dim != -1 else min(max(wanted, low), high))
        out[tensor.name] = np.zeros(shape, dtype=numpy_dtype(tensor.dtype))
    return out


def available_targets() -> tuple[str, ...]:
    here = Path(__file__).parent
    return tuple(t for t in TARGETS if (here / f"{t}.py").exists())


def exporter_for(target: str) -> ModuleType:
    """The exporter module of ``target``; a one-line ConfigError for planned or unknown targets."""
    if target in available_targets():
        return importlib.import_module(f"converter.exporters.{target}")
    if target == "gguf":
        raise ConfigError(
            "target 'gguf' is for language models (register one with 'edgefleet-convert register-llm'); "
            f"this model's targets: {', '.join(available_targets())}"
        )
    if target in TARGETS:
        raise ConfigError(
            f"target '{target}' is not available yet in this release (available: {', '.join(available_targets())})"
        )
    raise ConfigError(f"target '{target}' is unknown (available: {', '.join(available_targets())})")


def parse_targets(text: str) -> tuple[str, ...]:
    """``"onnx,ort"`` -> ("onnx", "ort"), each checked to have an exporter."""
    targets = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not targets:
        raise ConfigError("--targets names no target")
    for target in targets:
        exporter_for(target)
    return targets

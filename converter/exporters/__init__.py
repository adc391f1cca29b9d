"""Exporters: one module per deployment target (``converter/exporters/<target>.py``), found by name.

Each module provides:

- ``TARGET`` and ``RUNTIME`` (the ``Requirements.runtime`` devices need);
- ``PRECISIONS``: the precisions it can build, in ladder order (most aggressive first);
- ``build(ctx, precision, out_dir) -> BuiltVariant``: write the variant's files into ``out_dir``;
- ``open_runner(variant) -> Runner``: the variant loaded in its real runtime. A target the host
  cannot execute (Core ML on Linux) will return ``None`` and its variants will be ``structural``;
  the pipeline handles that case when such a target arrives (wave 2), not before.

Targets of the bundle format without a module here (``tflite``, ``coreml``, ``gguf`` in wave 1) are
refused with one line saying they are not available yet. Adding a target means adding a module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from bundles.errors import ConfigError
from bundles.manifest import TARGETS, Requirements


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


def available_targets() -> tuple[str, ...]:
    here = Path(__file__).parent
    return tuple(t for t in TARGETS if (here / f"{t}.py").exists())


def exporter_for(target: str) -> ModuleType:
    """The exporter module of ``target``; a one-line ConfigError for planned or unknown targets."""
    if target in available_targets():
        return importlib.import_module(f"converter.exporters.{target}")
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

"""What exporters share while one conversion runs: the source, the spec, the data, cached ONNX files.

Targets derived from ONNX (``onnx``, ``ort``) ask :meth:`BuildContext.onnx_variant` for the ONNX
file at a precision, which is built once per conversion and reused. Targets that convert from the
source directly (``tflite``, ``coreml``) use :attr:`BuildContext.source` instead, and keep what
they convert once in :attr:`BuildContext.cache`. Runtimes of other Python environments (the old
tflite-runtime) run in one worker process per conversion (:meth:`BuildContext.worker`), stopped by
:meth:`BuildContext.close`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundles.errors import ConversionError, RuntimeUnavailableError
from converter.datasets import Dataset, batch_sizes_for
from converter.onnx_tools import check_inputs_match_spec, check_model, load_onnx
from converter.quantize import make_precision
from converter.sources import SourceModel
from converter.spec import ModelSpec
from converter.workers import RuntimeWorker


@dataclass
class BuildContext:
    """Shared, lazily built inputs of every exporter during one conversion."""

    name: str
    spec: ModelSpec
    source: SourceModel
    calibration: Dataset | None
    work_dir: Path
    _onnx: dict[str, Path] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    """Per-conversion scratch space for exporters (e.g. a batch of ORT conversions done once)."""
    _workers: dict[str, RuntimeWorker | RuntimeUnavailableError] = field(default_factory=dict)

    def worker(self, runtime: str) -> RuntimeWorker:
        """The conversion's worker process of ``runtime`` (started once; an unavailable runtime stays so)."""
        if runtime not in self._workers:
            try:
                self._workers[runtime] = RuntimeWorker(runtime, self.work_dir / f"worker-{runtime}")
            except RuntimeUnavailableError as e:
                self._workers[runtime] = e
        found = self._workers[runtime]
        if isinstance(found, RuntimeUnavailableError):
            raise RuntimeUnavailableError(str(found))
        return found

    def close(self) -> None:
        """Stop the worker processes."""
        for worker in self._workers.values():
            if isinstance(worker, RuntimeWorker):
                worker.close()
        self._workers.clear()

    @property
    def max_batch(self) -> int:
        return batch_sizes_for(self.spec.inputs[0])[1]

    def fp32_onnx(self) -> Path:
        """The source exported to one checked fp32 ONNX file (inputs as declared)."""
        if "fp32" not in self._onnx:
            path = self.work_dir / "onnx-cache" / "fp32.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.source.export_onnx(path)
            model = load_onnx(path)
            check_model(model, "the exported model")
            check_inputs_match_spec(model, self.spec.inputs, "the exported model")
            self._onnx["fp32"] = path
        return self._onnx["fp32"]

    def onnx_variant(self, precision: str) -> Path:
        """The ONNX model at ``precision`` (built from :meth:`fp32_onnx` once, then cached)."""
        fp32 = self.fp32_onnx()
        if precision not in self._onnx:
            path = fp32.parent / f"{precision}.onnx"
            try:
                make_precision(fp32, precision, path, self.calibration, self.spec.calibration_method, self.max_batch)
            except ConversionError:
                path.unlink(missing_ok=True)
                raise
            self._onnx[precision] = path
        return self._onnx[precision]

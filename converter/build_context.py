"""What exporters share while one conversion runs: the source, the spec, the data, cached ONNX files.

Targets derived from ONNX (``onnx``, ``ort``) ask :meth:`BuildContext.onnx_variant` for the ONNX
file at a precision, which is built once per conversion and reused. Targets that convert from the
source directly (``tflite``, ``coreml`` in wave 2) use :attr:`BuildContext.source` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundles.errors import ConversionError
from converter.datasets import Dataset, batch_sizes_for
from converter.onnx_tools import check_inputs_match_spec, check_model, load_onnx
from converter.quantize import make_precision
from converter.sources import SourceModel
from converter.spec import ModelSpec


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

"""What the endpoint serves: a loaded model behind one small interface, and the loaders that make one.

:class:`ServedModel` is all the HTTP layer, the batcher and the repository know of a model: its
identity, its memory cost, its OIP metadata, a per-request input check, and ``run_batch`` (a list
of requests in, a list of output dicts out). :class:`BundleModel` is the one for bundles run by the
device's :class:`bundles.predictor.Predictor` (ONNX Runtime, LiteRT, ...): loading it runs the
golden self-test, so a model that is served has passed it.

Another kind of model (an LLM served by llama.cpp with OpenAI-style routes) plugs in as another
:class:`ModelLoader` in :attr:`fleet_server.inference.repository.ModelRepository.loaders`: the first
loader whose ``accepts(manifest)`` is true loads the bundle; its routes can find loaded models
through the same repository (``await repository.get(name, version)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from bundles.errors import InputError
from bundles.manifest import Manifest, TensorSpec
from bundles.oip import MANIFEST_TO_OIP
from bundles.predictor import Predictor
from fleet_server.inference.source import OpenedBundle


class ServedModel(Protocol):
    """A loaded, self-tested model."""

    name: str
    version: int
    kind: str
    memory_bytes: int
    max_batch_size: int | None
    """From the bundle's serving hints (None: the endpoint's setting); 1 turns batching off."""
    max_queue_delay_us: int | None

    def metadata(self) -> dict[str, Any]: ...

    def check(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Refuse inputs the model cannot take (:class:`InputError`); the number of rows they hold."""
        ...

    def run_batch(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]: ...

    def close(self) -> None: ...


class ModelLoader(Protocol):
    """Makes a :class:`ServedModel` of a verified bundle it accepts."""

    kind: str

    def accepts(self, manifest: Manifest) -> bool: ...

    def load(self, bundle: OpenedBundle, memory_per_byte: float) -> ServedModel: ...


class BundleModel:
    """A bundle variant in the device's Predictor: the same code, the same bytes, the same answers."""

    kind = "bundle"

    def __init__(self, predictor: Predictor, memory_bytes: int) -> None:
        self.predictor = predictor
        self.manifest = predictor.manifest
        self.name, self.version = self.manifest.name, self.manifest.version
        self.memory_bytes = memory_bytes
        hints = self.manifest.runtime_config.extra.get("serving")
        hints = hints if isinstance(hints, dict) else {}
        self.max_batch_size = _positive_int(hints.get("max_batch_size"))
        self.max_queue_delay_us = _positive_int(hints.get("max_queue_delay_us"), allow_zero=True)
        if not predictor.dynamic_batch:
            self.max_batch_size = 1  # a fixed batch dimension cannot be stacked
        self._inputs = self.manifest.inputs
        self.non_finite_inputs = frozenset(t.name for t in self._inputs if t.extra.get("allow_non_finite") is True)
        """Inputs whose schema allows NaN and infinities (refused in every other input, as on a device)."""

    def metadata(self) -> dict[str, Any]:
        """The OIP model metadata (tensors as the model file declares them, -1 for a free dimension)."""

        def tensors(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": MANIFEST_TO_OIP[t.dtype], "shape": list(t.shape)} for t in specs]

        return {
            "name": self.name, "versions": [str(self.version)], "platform": f"edgefleet_{self.predictor.runtime_name}",
            "inputs": tensors(self.manifest.inputs), "outputs": tensors(self.manifest.outputs),
            "parameters": {"variant": self.predictor.variant.id, "task": self.manifest.task},
        }  # fmt: skip

    def check(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Each declared input present, of a usable datatype, rank and fixed dimensions; no stray inputs."""
        unknown = set(inputs) - {t.name for t in self._inputs}
        if unknown:
            raise InputError(f"model '{self.name}' has no input(s) {', '.join(sorted(unknown))}")
        rows = None
        for spec in self._inputs:
            rows = _check_input(spec, inputs.get(spec.name), rows)
        return rows or 1

    def run_batch(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """One model call for the whole list (the Predictor stacks them), raw outputs beside post-processed."""
        predictions = self.predictor.predict_batch(requests)
        return [{**p.raw, **p.outputs} for p in predictions]

    def close(self) -> None:
        self.predictor.close()


def _check_input(spec: TensorSpec, value: np.ndarray | None, rows: int | None) -> int | None:
    if value is None:
        raise InputError(f"missing input '{spec.name}'")
    expected = [d if d != -1 else "?" for d in spec.shape]
    if value.ndim != len(spec.shape) or any(s not in (-1, v) for s, v in zip(spec.shape, value.shape, strict=True)):
        raise InputError(f"input '{spec.name}': shape {list(value.shape)} does not match {expected}")
    want = np.dtype(object) if spec.dtype == "string" else np.dtype(spec.dtype)
    if value.dtype != want:
        raise InputError(
            f"input '{spec.name}': datatype {_oip_name(value.dtype)} given, "
            f"the model takes {MANIFEST_TO_OIP[spec.dtype]}"
        )
    if not value.ndim:
        return rows
    if rows is not None and value.shape[0] != rows:
        raise InputError(f"input '{spec.name}': {value.shape[0]} rows where the other inputs have {rows}")
    return int(value.shape[0])


def _oip_name(dtype: np.dtype[Any]) -> str:
    from bundles.oip import oip_datatype

    try:
        return oip_datatype(dtype)
    except InputError:
        return str(dtype)


def _positive_int(value: Any, allow_zero: bool = False) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if value > 0 or (allow_zero and value == 0) else None


class BundleLoader:
    """Loads any bundle the device Predictor can run here, and self-tests it before it serves."""

    kind = "bundle"

    def accepts(self, manifest: Manifest) -> bool:  # noqa: ARG002 - the fallback loader: every bundle
        return True

    def load(self, bundle: OpenedBundle, memory_per_byte: float) -> ServedModel:
        predictor = Predictor.load(bundle.manifest, bundle.directory, variant=bundle.variant)
        try:
            predictor.self_test()
        except Exception:
            predictor.close()
            raise
        size = sum(f.size_bytes for f in bundle.manifest.variant(bundle.variant).files)
        return BundleModel(predictor, int(size * memory_per_byte))

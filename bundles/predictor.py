"""The Predictor: one variant of a bundle loaded into its runtime, with its pre/post-processing.

Flow of :meth:`Predictor.predict`: pre-processing steps -> input check against the manifest's
input schema -> the runtime -> post-processing steps -> :class:`Prediction` (``outputs`` after
post-processing, ``raw`` model outputs). Everything that can be decided once is decided at
:meth:`Predictor.load` (variant, runtime, compiled steps, per-input dtype/rank/fixed dimensions),
so the hot path adds a few microseconds to the runtime call.

:meth:`Predictor.predict_batch` concatenates requests along the batch dimension and runs the model
once when every input and output has a dynamic batch (the first dimension is -1), otherwise it
loops. :meth:`Predictor.self_test` replays the bundle's golden cases through the raw model and
compares with the golden tolerance (per-variant overrides apply); a failure is a
:class:`SelfTestError` naming the bundle, the variant, the case and the numbers.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundles.archive import read_manifest, verify_files
from bundles.errors import InferenceError, InputError, ManifestError, RuntimeUnavailableError, SelfTestError
from bundles.manifest import EncodedTensor, GoldenCase, Manifest, TensorSpec, Variant
from bundles.processing import Pipeline, compile_steps
from bundles.runtimes.base import Runtime, load_runtime
from bundles.selection import (
    DeviceCapabilities,
    probe_capabilities,
    rejection_reasons,
    select_variant,
    validated_runtime_for,
)
from bundles.tensors import conform, decode_tensor, numpy_dtype


@dataclass(frozen=True)
class Prediction:
    """One prediction: ``outputs`` after post-processing and the model's ``raw`` outputs."""

    outputs: dict[str, np.ndarray]
    raw: dict[str, np.ndarray]


@dataclass(frozen=True)
class SelfTestReport:
    """What a self-test measured: per-output max absolute error, top-1 agreement, failures."""

    bundle: str
    variant: str
    cases: int
    passed: bool
    max_abs_error: dict[str, float]
    top1_agreement: float | None
    atol: float
    rtol: float
    min_top1_agreement: float | None
    failures: tuple[str, ...] = ()
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for install events and telemetry."""
        return {
            "bundle": self.bundle,
            "variant": self.variant,
            "cases": self.cases,
            "passed": self.passed,
            "max_abs_error": dict(self.max_abs_error),
            "top1_agreement": self.top1_agreement,
            "atol": self.atol,
            "rtol": self.rtol,
            "min_top1_agreement": self.min_top1_agreement,
            "failures": list(self.failures),
            "duration_ms": self.duration_ms,
        }


@dataclass(frozen=True)
class _InputCheck:
    """The precomputed checks of one model input."""

    name: str
    dtype: np.dtype[Any]
    ndim: int
    fixed_dims: tuple[tuple[int, int], ...]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, spec: TensorSpec) -> _InputCheck:
        fixed = tuple((axis, size) for axis, size in enumerate(spec.shape) if size != -1)
        return cls(spec.name, numpy_dtype(spec.dtype), len(spec.shape), fixed, spec.shape)

    def coerce(self, value: Any) -> np.ndarray:
        """Convert a non-exact value to the declared dtype (:func:`bundles.tensors.conform`, the fallback's too)."""
        return conform(value, self.dtype, self.name)

    def shape_error(self, value: np.ndarray) -> InputError:
        expected = [d if d != -1 else "?" for d in self.shape]
        return InputError(f"input '{self.name}': shape {list(value.shape)} does not match {expected}")


@dataclass
class _SelfTestTally:
    max_abs_error: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    top1_hits: int = 0
    top1_rows: int = 0


class Predictor:
    """A loaded variant. Not thread-safe for ``close``; ``predict`` may be called from many threads."""

    def __init__(self, manifest: Manifest, variant: Variant, runtime: Runtime, threads: int) -> None:
        self.manifest = manifest
        self.variant = variant
        self.runtime = runtime
        self.runtime_name: str = runtime.name
        """The runtime that executes the variant (``litert``, ``tflite_runtime``, ...), reported by devices."""
        self.threads = threads
        self._checks = tuple(_InputCheck.of(spec) for spec in manifest.inputs)
        self._pre: Pipeline = compile_steps(manifest.preprocess, "pre", manifest.inputs[0].name)
        self._post: Pipeline = compile_steps(manifest.postprocess, "post", manifest.outputs[0].name)
        self._pre_fn = self._pre if self._pre else None  # decided once, not per call
        self._post_fn = self._post if self._post else None
        specs = manifest.inputs + manifest.outputs
        self.dynamic_batch = all(len(s.shape) > 0 and s.shape[0] == -1 for s in specs)

    @classmethod
    def load(
        cls,
        manifest: Manifest,
        bundle_dir: str | Path,
        variant: str | Variant | None = None,
        caps: DeviceCapabilities | None = None,
        threads: int | None = None,
        verify: bool = True,
    ) -> Predictor:
        """Load a variant (by id, or the best one for ``caps``/this host) from a bundle directory.

        The variant runs on a runtime it was validated on (:func:`bundles.selection.validated_runtime_for`
        with ``caps``, or this host's probed capabilities); when this host has none, loading is refused
        with the reasons (:class:`RuntimeUnavailableError`). ``verify`` re-checks the variant's files
        against the manifest hashes first (turn it off only when the caller has just verified them,
        e.g. right after unpacking).
        """
        caps = caps if caps is not None else probe_capabilities()
        chosen = _resolve_variant(manifest, variant, caps)
        runtime_name = _runtime_for(manifest, chosen, caps)
        root = Path(bundle_dir)
        if verify:
            verify_files(root, chosen.files)
        n_threads = threads if threads is not None else manifest.runtime_config.threads
        runtime = load_runtime(
            chosen.target, root / chosen.entry, n_threads, chosen.requirements.accelerators, runtime=runtime_name
        )
        _check_runtime_names(manifest, chosen, runtime)
        return cls(manifest, chosen, runtime, n_threads)

    @classmethod
    def from_dir(
        cls,
        bundle_dir: str | Path,
        variant: str | Variant | None = None,
        caps: DeviceCapabilities | None = None,
        threads: int | None = None,
        expected_manifest_sha256: str | None = None,
    ) -> Predictor:
        """Read ``manifest.json`` of a bundle directory (checking its hash if given) and load it."""
        manifest = read_manifest(bundle_dir, expected_manifest_sha256)
        return cls.load(manifest, bundle_dir, variant=variant, caps=caps, threads=threads)

    # --- the hot path --------------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, Any]) -> Prediction:
        """Pre-process, check, run and post-process one request (arrays batch first)."""
        feeds = self._pre_fn(inputs) if self._pre_fn is not None else inputs
        raw = self.runtime.run(self._checked(feeds))
        return Prediction(self._post_fn(raw) if self._post_fn is not None else raw, raw)

    def run_model(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model alone (no pre/post-processing) on inputs checked against the schema."""
        return self.runtime.run(self._checked(feeds))

    def _checked(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        checked: dict[str, np.ndarray] = {}
        for check in self._checks:
            value = feeds.get(check.name)
            if value is None:
                raise InputError(f"missing input '{check.name}' (the model takes {', '.join(self.input_names)})")
            if type(value) is not np.ndarray or value.dtype != check.dtype:
                value = check.coerce(value)
            if value.ndim != check.ndim:
                raise check.shape_error(value)
            for axis, size in check.fixed_dims:
                if value.shape[axis] != size:
                    raise check.shape_error(value)
            checked[check.name] = value
        return checked

    # --- batches -------------------------------------------------------------------------------

    def predict_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[Prediction]:
        """Predict many requests: one model call when the batch dimension is dynamic, else a loop."""
        if len(requests) < 2 or not self.dynamic_batch:
            return [self.predict(r) for r in requests]
        names = list(requests[0])
        if any(list(r) != names for r in requests[1:]):
            raise InputError("all requests of a batch must have the same input names")
        arrays = {n: [np.asarray(r[n]) for r in requests] for n in names}
        sizes = [a.shape[0] if a.ndim else 0 for a in arrays[names[0]]]
        try:
            stacked = {n: np.concatenate(parts, axis=0) for n, parts in arrays.items()}
        except ValueError as e:
            raise InputError(f"requests of a batch cannot be stacked: {e}") from e
        whole = self.predict(stacked)
        return _split_prediction(whole, sizes)

    # --- golden self-test ----------------------------------------------------------------------

    def self_test(self) -> SelfTestReport:
        """Replay the golden cases through the raw model; :class:`SelfTestError` if any is off."""
        started = time.perf_counter()
        golden = self.manifest.golden
        atol, rtol, min_top1 = golden.tolerance_for(self.variant.id)
        tally = _SelfTestTally()
        for index, case in enumerate(golden.cases):
            self._check_case(index, case, atol, rtol, tally)
        agreement = tally.top1_hits / tally.top1_rows if tally.top1_rows else None
        if min_top1 is not None and agreement is not None and agreement < min_top1:
            tally.failures.append(f"top-1 agreement {agreement:.4f} is below the required {min_top1}")
        report = SelfTestReport(
            bundle=self.manifest.ref,
            variant=self.variant.id,
            cases=len(golden.cases),
            passed=not tally.failures,
            max_abs_error=tally.max_abs_error,
            top1_agreement=agreement,
            atol=atol,
            rtol=rtol,
            min_top1_agreement=min_top1,
            failures=tuple(tally.failures),
            duration_ms=(time.perf_counter() - started) * 1000.0,
        )
        if tally.failures:
            more = f" (and {len(tally.failures) - 1} more)" if len(tally.failures) > 1 else ""
            where = f"{report.bundle} variant {report.variant}"
            error = SelfTestError(f"{where}: self-test failed: {tally.failures[0]}{more}")
            error.report = report
            raise error
        return report

    def _check_case(self, index: int, case: GoldenCase, atol: float, rtol: float, tally: _SelfTestTally) -> None:
        try:
            outputs = self.run_model({k: decode_tensor(v) for k, v in case.inputs.items()})
        except InferenceError as e:
            tally.failures.append(f"golden case {index}: the model failed: {e}")
            return
        for name, encoded in _expected_for(case, self.variant.id).items():
            problem = _compare(name, outputs.get(name), decode_tensor(encoded), atol, rtol, tally)
            if problem:
                tally.failures.append(f"golden case {index} {problem}")
        first = self.manifest.outputs[0].name
        if first in case.expected and first in outputs:
            _count_top1(outputs[first], decode_tensor(case.expected[first]), tally)

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self._checks)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.manifest.outputs)

    def close(self) -> None:
        """Release the runtime; the predictor cannot be used afterwards."""
        self.runtime.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _resolve_variant(manifest: Manifest, variant: str | Variant | None, caps: DeviceCapabilities) -> Variant:
    if isinstance(variant, Variant):
        return manifest.variant(variant.id)
    if isinstance(variant, str):
        return manifest.variant(variant)
    return select_variant(manifest, caps)


def _runtime_for(manifest: Manifest, variant: Variant, caps: DeviceCapabilities) -> str:
    """The validated runtime ``caps`` has for ``variant``; refused with every reason when there is none."""
    name = validated_runtime_for(variant, caps)
    if name is not None:
        return name
    reasons = rejection_reasons(variant, caps)
    if variant.target == "coreml":
        from bundles.runtimes.coreml import unavailable_reason

        reasons = [r for r in (unavailable_reason(),) if r] + reasons
    raise RuntimeUnavailableError(
        f"{manifest.ref} variant {variant.id} cannot run on this host: {'; '.join(reasons) or 'no runtime for it'}"
    )


def _check_runtime_names(manifest: Manifest, variant: Variant, runtime: Runtime) -> None:
    """The model file must take and give the tensors the manifest declares."""
    declared_in = {t.name for t in manifest.inputs}
    declared_out = {t.name for t in manifest.outputs}
    if declared_in != set(runtime.input_names) or not declared_out <= set(runtime.output_names):
        runtime.close()
        raise ManifestError(
            f"{manifest.ref} variant {variant.id}: the model's tensors (inputs {list(runtime.input_names)}, "
            f"outputs {list(runtime.output_names)}) differ from the manifest's "
            f"(inputs {sorted(declared_in)}, outputs {sorted(declared_out)})"
        )


def _expected_for(case: GoldenCase, variant_id: str) -> dict[str, EncodedTensor]:
    """The case's expected outputs for ``variant_id``: its own (``expected_by_variant``, generation bundles, whose
    greedy tokens are each variant's own), else the shared ones."""
    own = (case.extra.get("expected_by_variant") or {}).get(variant_id)
    if not isinstance(own, dict):
        return case.expected
    try:
        return {k: EncodedTensor.from_dict(v, f"golden.expected_by_variant.{variant_id}.{k}") for k, v in own.items()}
    except ManifestError:
        return case.expected


def _split_prediction(whole: Prediction, sizes: list[int]) -> list[Prediction]:
    total = sum(sizes)
    ends = list(itertools.accumulate(sizes))
    bounds = list(zip([0, *ends[:-1]], ends, strict=True))  # plain slices: np.split costs ~10 us a piece
    sliced: dict[int, list[np.ndarray]] = {}  # a tensor in both outputs and raw is sliced once

    def split(tensors: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        parts = [{} for _ in sizes]  # type: list[dict[str, np.ndarray]]
        for name, value in tensors.items():
            pieces = sliced.get(id(value))
            if pieces is None:
                whole_batch = value.ndim and value.shape[0] == total
                pieces = sliced[id(value)] = [value[a:b] for a, b in bounds] if whole_batch else [value] * len(sizes)
            for part, piece in zip(parts, pieces, strict=True):
                part[name] = piece
        return parts

    return [Prediction(o, r) for o, r in zip(split(whole.outputs), split(whole.raw), strict=True)]


def _compare(
    name: str, got: np.ndarray | None, expected: np.ndarray, atol: float, rtol: float, tally: _SelfTestTally
) -> str | None:
    """A failure description for one output, or None; records the max absolute error."""
    if got is None:
        return f"output '{name}': the model did not produce it"
    if got.shape != expected.shape:
        return f"output '{name}': shape {list(got.shape)}, expected {list(expected.shape)}"
    if expected.dtype.kind not in "biuf":
        return None if np.array_equal(got, expected) else f"output '{name}': values differ"
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    worst = float(diff.max()) if diff.size else 0.0
    tally.max_abs_error[name] = max(tally.max_abs_error.get(name, 0.0), worst)
    allowed = atol + rtol * np.abs(expected.astype(np.float64))
    if np.all(diff <= allowed):
        return None
    at = np.unravel_index(int(np.argmax(diff - allowed)), diff.shape)
    return (
        f"output '{name}': max abs error {worst:.6g} exceeds atol {atol:g} + rtol {rtol:g}*|expected| "
        f"(at index {[int(i) for i in at]}: got {float(got[at]):.6g}, expected {float(expected[at]):.6g})"
    )


def _count_top1(got: np.ndarray, expected: np.ndarray, tally: _SelfTestTally) -> None:
    if got.shape != expected.shape or got.ndim == 0 or expected.dtype.kind not in "iuf":
        return
    hits = np.argmax(got, axis=-1) == np.argmax(expected, axis=-1)
    tally.top1_hits += int(np.sum(hits))
    tally.top1_rows += int(hits.size)


__all__ = ["Prediction", "Predictor", "SelfTestReport"]

"""From gated variants to a bundle: manifest, golden cases, drift baseline, lineage, archive.

Golden cases. The manifest holds one set of golden inputs for all variants, so the expected
outputs are the *source model's* outputs (fp32, the truth every variant was gated against), not
any one variant's. Each published variant must reproduce them: ``golden.atol`` is what the fp32
variants achieved, and ``golden.variant_tolerances[<id>]`` gives each quantised variant the
tolerance it achieved here on exactly these inputs, times :data:`TOLERANCE_MARGIN` for the kernel
differences of another CPU. For classifiers the cases are chosen among evaluation rows where
every published variant makes the source's class decisions (read as the readout says: argmax, a
threshold on one logit, per-label decisions), so ``top1_agreement = 1.0`` is achievable by every
variant and a device that disagrees really runs a different model.

Drift baseline. Tabular inputs (2-D, at most :data:`MAX_TABULAR_FEATURES` columns) get one
histogram per column. Image-like inputs (more dimensions or more columns) get per-row summary
features, ``<input>.mean``, ``<input>.std``, ``<input>.min`` and ``<input>.max`` (declared in
``features`` with ``"aggregate"``), which move when brightness, contrast or sensor saturation
drift, at a cost that fits a device; constant summaries are dropped (no bins to draw). Bins are
deciles of the evaluation inputs. The output baseline is the distribution of the source's
predicted classes over the class names (classification: of the model's own label output when it
has one, e.g. scikit-learn's ``label``, else of the readout's decisions) or deciles of the values.

The manifest carries the readout (which output, in which form, the class names: string class
labels of a scikit-learn model included) and says per variant whether its bytes are
reproducible (``metrics.reproducible``).

Determinism: everything here depends only on the registered files, the spec and the measured
parity figures (timings are kept out of the manifest), and ``created_at`` is the registration
time, so converting the same version twice gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bundles.canonical import sha256_file
from bundles.manifest import (
    DriftBaseline,
    FeatureSpec,
    FileRef,
    Golden,
    GoldenCase,
    Histogram,
    Lineage,
    Manifest,
    Readout,
    RuntimeConfig,
    Step,
    TensorSpec,
    Variant,
)
from bundles.readout import CLASS_SCORES
from bundles.tensors import dtype_name, encode_tensor
from converter.datasets import Dataset, batch_sizes_for
from converter.exporters import BuiltVariant
from converter.gates import Reference
from converter.metrics import MULTILABEL, SINGLE_LABEL, predicted_classes
from converter.registry import ModelVersion

GOLDEN_CASES = 8
TOLERANCE_MARGIN = 2.0
MIN_ATOL = 1e-5
STRUCTURAL_ATOL_SHARE = 0.05
MAX_TABULAR_FEATURES = 64
DRIFT_BINS = 10
SUMMARIES = ("mean", "std", "min", "max")
MANIFEST_METRIC_KEYS = (
    "max_abs_error", "cosine", "top1_agreement", "metric", "metric_value", "source_metric_value", "metric_drop",
    "size_bytes", "size_ratio_to_fp32", "dynamic_extremes", "golden_atol", "ladder_rank", "preferred",
    "gates", "reproducible", "runtimes", "batch", "route", "deployment_target", "structural", "spec_version",
    "model_type", "ops", "weights_bytes", "weights_ratio_to_fp32", "weight_errors", "imatrix",
)  # fmt: skip
"""Gate results written into each variant's ``metrics``: only reproducible figures (timings stay in the report)."""
RUNTIME_METRIC_KEYS = ("status", "version", "max_abs_error", "cosine", "top1_agreement", "metric_value", "metric_drop")
"""Per runtime (``metrics.runtimes``): where the variant ran and what it measured there (no timings, no reasons
that quote them)."""


def _round(value: Any) -> Any:
    """Floats to 6 significant digits, inside lists and objects too."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def manifest_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The reproducible subset of a variant's measurements, floats rounded to 6 significant digits."""
    out: dict[str, Any] = {}
    for key in MANIFEST_METRIC_KEYS:
        value = metrics.get(key)
        if key == "runtimes" and isinstance(value, dict):
            value = {name: {k: v for k, v in entry.items() if k in RUNTIME_METRIC_KEYS}
                     for name, entry in value.items()}  # fmt: skip
        if value is not None:
            out[key] = _round(value)
    return out


def golden_rows(reference: Reference, variant_outputs: list[dict[str, np.ndarray]], rows: int) -> list[int]:
    """Evaluation rows for golden cases: spread over the data, where every variant makes the source's decisions."""
    rows = min(rows, len(reference.outputs[reference.primary]))
    candidates = np.arange(rows)
    reading = reference.readout.reading
    if reading.form in SINGLE_LABEL + MULTILABEL:
        truth = predicted_classes(reference.outputs[reference.primary], reading).reshape(rows, -1)
        agree = np.ones(rows, dtype=bool)
        for outputs in variant_outputs:
            decided = predicted_classes(outputs[reference.primary][:rows], reading).reshape(rows, -1)
            agree &= np.all(decided == truth, axis=1)
        candidates = candidates[agree] if agree.any() else candidates
    picks = np.linspace(0, len(candidates) - 1, num=min(GOLDEN_CASES, len(candidates))).round().astype(int)
    return sorted({int(candidates[i]) for i in picks})


def golden_for(data: Dataset, reference: Reference, chosen: list[int], per_variant: dict[str, dict[str, np.ndarray]],
               fp32_ids: list[str], batch: int, unexecuted: list[str] | None = None) -> Golden:  # fmt: skip
    """Golden cases (source outputs as expected) and tolerances every published variant meets.

    A variant the converter could not execute (``structural``) meets its golden cases for the first
    time on a device: it gets the loosest tolerance an executed variant needed, at least
    :data:`STRUCTURAL_ATOL_SHARE` of the largest source output on these rows, and top-1 agreement on
    classifiers still holds it to the source's decisions.
    """
    cases = []
    for row in chosen:
        index = np.arange(row, row + batch) % data.rows
        inputs = {name: encode_tensor(array[index]) for name, array in data.inputs.items()}
        expected = {name: encode_tensor(values[index]) for name, values in reference.outputs.items()}
        cases.append(GoldenCase(inputs=inputs, expected=expected))
    errors = {vid: _golden_error(outputs, reference, chosen, batch) for vid, outputs in per_variant.items()}
    base_atol = _atol(max((errors[v] for v in fp32_ids), default=0.0))
    overrides = {vid: {"atol": _atol(err)} for vid, err in sorted(errors.items()) if _atol(err) > base_atol}
    loosest = float(max([base_atol, STRUCTURAL_ATOL_SHARE * _output_scale(reference, chosen)]
                        + [o["atol"] for o in overrides.values()]))  # fmt: skip
    if loosest > base_atol:
        overrides.update({vid: {"atol": float(f"{loosest:.6g}")} for vid in sorted(unexecuted or [])})
    overrides = dict(sorted(overrides.items()))
    top1 = 1.0 if _device_reads_top1(reference) else None
    return Golden(cases=tuple(cases), atol=base_atol, rtol=0.0, top1_agreement=top1, variant_tolerances=overrides)


def _output_scale(reference: Reference, chosen: list[int]) -> float:
    values = [np.max(np.abs(v[chosen])) for v in reference.outputs.values() if v.dtype.kind == "f" and chosen]
    return float(max(values, default=0.0))


def _device_reads_top1(reference: Reference) -> bool:
    """A device's self-test counts top-1 (argmax) on the first output: meaningful only for class scores there."""
    first = next(iter(reference.outputs))
    return reference.readout.form in CLASS_SCORES and reference.primary == first


def _golden_error(outputs: dict[str, np.ndarray], reference: Reference, chosen: list[int], batch: int) -> float:
    worst = 0.0
    rows = len(reference.outputs[reference.primary])
    for name, expected in reference.outputs.items():
        if expected.dtype.kind != "f":
            continue
        for row in chosen:
            index = np.arange(row, row + batch) % rows
            worst = max(worst, float(np.max(np.abs(outputs[name][index].astype(np.float64) - expected[index]))))
    return worst


def _atol(error: float) -> float:
    return float(f"{max(MIN_ATOL, TOLERANCE_MARGIN * error):.6g}")


def features_and_baseline(data: Dataset, reference: Reference, model: ModelVersion) -> tuple[
        tuple[FeatureSpec, ...], DriftBaseline]:  # fmt: skip
    """Feature schema (declared, or derived) and the drift baseline from the evaluation inputs."""
    declared = tuple(FeatureSpec.from_dict(f) for f in model.spec.features)
    derived: list[FeatureSpec] = []
    histograms: list[Histogram] = []
    for spec in model.spec.inputs:
        array = data.inputs[spec.name]
        if array.ndim == 2 and array.shape[1] <= MAX_TABULAR_FEATURES:
            feats, hists = _tabular(spec.name, array, data.feature_names, declared)
        else:
            feats, hists = _summaries(spec.name, array)
        derived.extend(feats)
        histograms.extend(hists)
    features = declared or tuple(derived)
    return features, DriftBaseline(features=tuple(histograms), output=_output_histogram(reference))


def _tabular(name: str, array: np.ndarray, columns: tuple[str, ...], declared: tuple[FeatureSpec, ...]) -> tuple[
        list[FeatureSpec], list[Histogram]]:  # fmt: skip
    by_index = {f.index: f.name for f in declared if f.tensor in ("", name)}
    feats, hists = [], []
    for index in range(array.shape[1]):
        column = array[:, index].astype(np.float64)
        feature = by_index.get(index) or (columns[index] if index < len(columns) else f"{name}_{index}")
        feats.append(FeatureSpec(name=feature, type="float", tensor=name, index=index,
                                 min=_round(float(column.min())), max=_round(float(column.max()))))  # fmt: skip
        hist = _numeric_histogram(feature, column)
        if hist is not None:
            hists.append(hist)
    return feats, hists


def _summaries(name: str, array: np.ndarray) -> tuple[list[FeatureSpec], list[Histogram]]:
    flat = array.reshape(array.shape[0], -1).astype(np.float64)
    values = {"mean": flat.mean(1), "std": flat.std(1), "min": flat.min(1), "max": flat.max(1)}
    feats, hists = [], []
    for summary in SUMMARIES:
        hist = _numeric_histogram(f"{name}.{summary}", values[summary])
        if hist is None:
            continue
        feats.append(FeatureSpec(name=hist.name, type="float", tensor=name, index=0, extra={"aggregate": summary}))
        hists.append(hist)
    return feats, hists


def _numeric_histogram(name: str, values: np.ndarray) -> Histogram | None:
    """Decile bins (deduplicated); None when the values are constant."""
    edges = sorted({_round(float(e)) for e in np.quantile(values, np.linspace(0, 1, DRIFT_BINS + 1))})
    if len(edges) < 2:
        return None
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=np.asarray(edges))
    freqs = counts / max(1, counts.sum())
    return Histogram(name=name, edges=tuple(edges), freqs=tuple(_round(float(f)) for f in freqs))


def _output_histogram(reference: Reference) -> Histogram | None:
    readout = reference.readout
    values = reference.outputs[reference.primary]
    if readout.form not in SINGLE_LABEL:
        return _numeric_histogram(reference.primary, values.reshape(-1).astype(np.float64))
    decided = predicted_classes(values, readout.reading)
    counts = np.bincount(decided[decided >= 0], minlength=len(readout.classes))
    freqs = tuple(_round(float(c)) for c in counts / counts.sum())
    name, categories = reference.primary, readout.classes
    label_output = _label_output(reference)
    if label_output is not None:  # the model's own class values (scikit-learn's ``label``): what a device sees
        name, categories = label_output, readout.label_values
    return Histogram(name=name, categories=tuple(categories), freqs=freqs)


def _label_output(reference: Reference) -> str | None:
    """A 1-D integer or string output holding the model's class values, when the readout knows them."""
    if not reference.readout.label_values:
        return None
    for name, values in reference.outputs.items():
        if values.ndim == 1 and values.dtype.kind in "iuUSO":
            return name
    return None


def output_specs(reference: Reference, inputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """Output tensor specs: the batch dimension follows the first input's."""
    first = inputs[0]
    dynamic = first.shape[0] == -1
    specs = []
    for name, values in reference.outputs.items():
        shape = ((-1,) if dynamic else (first.shape[0],)) + tuple(int(d) for d in values.shape[1:])
        ranges = {"0": first.dim_ranges["0"]} if dynamic and "0" in first.dim_ranges else {}
        specs.append(TensorSpec(name=name, dtype=dtype_name(values.dtype), shape=shape, dim_ranges=ranges))
    return tuple(specs)


def variant_entry(built: BuiltVariant, bundle_dir: Path, metrics: dict[str, Any], status: str = "passed") -> Variant:
    """The manifest entry of a variant whose files were copied under ``bundle_dir/variants/<id>/``."""
    files = []
    for name in sorted(built.files):
        relative = f"variants/{built.id}/{name}"
        path = bundle_dir / relative
        files.append(FileRef(path=relative, sha256=sha256_file(path), size_bytes=path.stat().st_size))
    return Variant(
        id=built.id,
        target=built.target,
        precision=built.precision,
        entry=f"variants/{built.id}/{built.entry}",
        files=tuple(files),
        requirements=built.requirements,
        metrics=manifest_metrics(metrics),
        status=status,
    )


def make_manifest(model: ModelVersion, variants: list[Variant], reference: Reference, golden: Golden,
                  features: tuple[FeatureSpec, ...], baseline: DriftBaseline, tool_versions: dict[str, str],
                  options: dict[str, Any]) -> Manifest:  # fmt: skip
    spec = model.spec
    lineage = Lineage(
        source_sha256=model.source_sha256,
        calibration_sha256=model.calibration_sha256,
        eval_sha256=model.eval_sha256,
        registry_version=model.version,
        tool_versions=tool_versions,
        extra={"source_kind": model.source_kind, "conversion": options},
    )
    runtime = RuntimeConfig(threads=1, deterministic=True, budget_latency_ms=spec.budgets.max_latency_ms,
                            budget_memory_mb=spec.budgets.max_memory_mb, deadline_ms=spec.serving.deadline_ms,
                            confidence_threshold=spec.serving.confidence_threshold,
                            static_answer=spec.serving.static_answer)  # fmt: skip
    return Manifest(
        name=model.name,
        version=model.version,
        created_at=model.created_at,
        task=spec.task,
        inputs=spec.inputs,
        outputs=output_specs(reference, spec.inputs),
        variants=tuple(variants),
        features=features,
        preprocess=tuple(Step.from_dict(s) for s in spec.preprocess),
        postprocess=tuple(Step.from_dict(s) for s in spec.postprocess),
        golden=golden,
        drift_baseline=baseline,
        lineage=lineage,
        runtime_config=runtime,
        readout=Readout(
            output=reference.readout.output,
            form=reference.readout.form,
            threshold=reference.readout.threshold,
            classes=reference.readout.classes,
        ),
    )


def golden_batch(model: ModelVersion) -> int:
    """Rows per golden case: 1, or the fixed batch size of a model that only takes that."""
    low, _ = batch_sizes_for(model.spec.inputs[0])
    return low

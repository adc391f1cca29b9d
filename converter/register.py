"""``register``: check a model and its data, then record an immutable version with its lineage.

Everything is validated before anything is written: the eval and calibration files against the
declared inputs; the source model against the spec (:meth:`SourceModel.check`: a scikit-learn
model is exported here, so an estimator skl2onnx cannot convert is refused now, and a dtype,
width or feature names that are not the model's too); then the model runs on evaluation rows (and
at both ends of every dynamic dimension the spec declares), and from its outputs and the labels
the *readout* is inferred (which output the metric reads, in which form, the class names:
:mod:`converter.readout`) and the metric checked against the one table of valid task/metric pairs
(:mod:`converter.metrics`), with every label of the eval file encoded as the metric will read it.
A labels file must name as many classes as the output has.

The files are copied into a staging directory, the registry row is inserted in a transaction, the
directory is renamed to ``artifacts/<name>/<version>`` and only then is the transaction committed;
any failure removes the directory again (and the folders created for it), so the registry never
points at missing files and no orphan files or empty folders remain.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np

from bundles.canonical import canonical_json, sha256_bytes, sha256_file
from bundles.errors import ConfigError, EdgeFleetError
from converter.context import about
from converter.datasets import Dataset, load_dataset
from converter.gates import resized, run_in_chunks
from converter.home import publish_dir, staging_dir
from converter.metrics import DEFAULT_METRIC, check_metric, check_metric_task, check_task
from converter.readout import check_target_shape, encode_targets, infer_readout
from converter.registry import ModelVersion, ModelVersionRow, Registry, utc_now
from converter.sources import SourceModel, load_source, split_ref, stage_source
from converter.spec import ModelSpec

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_TOOLS = ("edgefleet", "torch", "onnx", "onnxruntime", "onnxscript", "onnxconverter-common", "skl2onnx",
          "scikit-learn", "numpy", "litert-torch", "ai-edge-quantizer", "ai-edge-litert", "coremltools")  # fmt: skip
_CHECK_ROWS = 64
"""Evaluation rows the source runs on at registration: enough to tell probabilities from logits."""


def tool_versions() -> dict[str, str]:
    """Installed versions of the tools that shape a conversion's output (absent ones are left out)."""
    found = {}
    for dist in _TOOLS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def register(registry: Registry, name: str, source: str, weights: Path | None, spec: ModelSpec, eval_path: Path,
             calibration_path: Path | None) -> ModelVersion:  # fmt: skip
    """Validate and record a new version of ``name``; nothing is written if any check fails."""
    if not _NAME_RE.match(name):
        raise ConfigError(f"model name '{name}' must be lowercase letters, digits, '.', '_' or '-' (max 64)")
    with about(f"{name} (new version)", "source"):
        return _register(registry, name, source, weights, spec, eval_path, calibration_path)


def _register(registry: Registry, name: str, source: str, weights: Path | None, spec: ModelSpec, eval_path: Path,
              calibration_path: Path | None) -> ModelVersion:  # fmt: skip
    kind, ref = split_ref(source)
    check_task(spec.task)
    if spec.metric is not None:
        check_metric_task(spec.metric, spec.task)  # before loading anything: the pair alone can be wrong
    eval_data = load_dataset(eval_path, spec.inputs, spec.label_key, "eval file")
    if calibration_path is not None:
        load_dataset(calibration_path, spec.inputs, spec.label_key, "calibration file")
    with staging_dir(registry.home.root / "artifacts" / name / "staging") as staging:
        stored = _stage_all(kind, ref, weights, spec.random_init, staging, eval_path, calibration_path)
        model = load_source(kind, [staging / "source" / f for f in stored], spec)
        model.check(eval_data.feature_names)
        spec = _with_readout(spec, model, _run_source(model, spec, eval_data), eval_data, eval_path)
        return _insert(registry, name, kind, source, stored, spec, staging, eval_path, calibration_path)


def _stage_all(kind: str, ref: str, weights: Path | None, random_init: bool, staging: Path, eval_path: Path,
               calibration_path: Path | None) -> list[str]:  # fmt: skip
    (staging / "source").mkdir()
    (staging / "data").mkdir()
    stored = stage_source(kind, ref, weights, staging / "source", random_init=random_init)
    shutil.copyfile(eval_path, staging / "data" / f"eval{eval_path.suffix}")
    if calibration_path is not None:
        shutil.copyfile(calibration_path, staging / "data" / f"calibration{calibration_path.suffix}")
    return stored


def _run_source(model: SourceModel, spec: ModelSpec, eval_data: Dataset) -> dict[str, np.ndarray]:
    """The source's outputs on the first evaluation rows; a model that cannot run on the spec is refused."""
    sample = Dataset(inputs=eval_data.take(0, _CHECK_ROWS), labels=None)
    try:
        outputs = run_in_chunks(model.predict, sample, spec)
    except ConfigError:
        raise
    except Exception as e:
        cause = str(e) if isinstance(e, EdgeFleetError) else f"{type(e).__name__}: {e}"
        raise ConfigError(f"the source model cannot run on the declared inputs (check --input): {cause}") from e
    if not outputs:
        raise ConfigError("the source model produced no outputs")
    _check_dynamic_dims(model, spec, sample)
    return outputs


def _check_dynamic_dims(model: SourceModel, spec: ModelSpec, sample: Dataset) -> None:
    """The source runs at both ends of every dynamic dimension the spec declares, or the spec is refused.

    A torch module takes any shape until it is exported: ``x: float32[-1,-1]`` for a ``Linear(30, ...)``
    registered, and the conversion failed later. (ONNX and scikit-learn sources have their fixed sizes
    checked against the spec already; this covers their batch range too.)
    """
    for tensor in spec.inputs:
        for key, (low, high) in sorted(tensor.dim_ranges.items()):
            for size in sorted({low, high}):
                try:
                    model.predict(resized(sample, tensor.name, int(key), size))
                except Exception as e:
                    cause = str(e) if isinstance(e, EdgeFleetError) else f"{type(e).__name__}: {e}"
                    raise ConfigError(
                        f"input '{tensor.name}' declares dimension {key} dynamic ({low}..{high}), but the source "
                        f"model fails at size {size}: {cause.splitlines()[0][:300]}"
                    ) from e


def _with_readout(spec: ModelSpec, model: SourceModel, outputs: dict[str, np.ndarray], eval_data: Dataset,
                  eval_path: Path) -> ModelSpec:  # fmt: skip
    """The spec with its readout inferred and its metric chosen and checked; every eval label encoded once."""
    labels = eval_data.labels
    readout = infer_readout(spec.task, outputs, labels, spec.request, spec.labels, model.class_values)
    chosen = check_metric(spec.metric or DEFAULT_METRIC[readout.form], spec.task, readout.reading, readout.output)
    what = f"eval file {eval_path.name}"
    if chosen.needs_labels and labels is None:
        raise ConfigError(f"{what} has no labels under '{spec.label_key}' (metric {chosen.name} compares with them)")
    targets = encode_targets(readout, labels, what)
    check_target_shape(readout, targets, outputs[readout.output], what)
    return dataclasses.replace(spec, metric=chosen.name, readout=readout)


def _insert(registry: Registry, name: str, kind: str, source: str, stored: list[str], spec: ModelSpec,
            staging: Path, eval_path: Path, calibration_path: Path | None) -> ModelVersion:  # fmt: skip
    source_files = [f"source/{f}" for f in stored]
    eval_file = f"data/eval{eval_path.suffix}"
    calib_file = f"data/calibration{calibration_path.suffix}" if calibration_path is not None else ""
    final: Path | None = None
    try:
        with registry.transaction() as session:
            version = registry.next_version(session, name)
            row = ModelVersionRow(
                name=name,
                version=version,
                created_at=utc_now(),
                source_kind=kind,
                source_ref=source,
                source_files=json.dumps(source_files),
                source_sha256=_files_digest(staging, source_files),
                eval_file=eval_file,
                eval_sha256=sha256_file(staging / eval_file),
                calibration_file=calib_file,
                calibration_sha256=sha256_file(staging / calib_file) if calib_file else "",
                spec_json=json.dumps(spec.to_dict(), sort_keys=True),
                tool_versions_json=json.dumps(tool_versions(), sort_keys=True),
            )
            session.add(row)
            session.flush()
            final = registry.home.artifacts_dir(name, version)
            publish_dir(staging, final)
            registered = ModelVersion.from_row(row)
    except BaseException:
        if final is not None:
            shutil.rmtree(final, ignore_errors=True)
        raise
    return registered


def _files_digest(root: Path, files: list[str]) -> str:
    """One sha256 over the stored source files (name and content hash of each, canonical JSON)."""
    return sha256_bytes(canonical_json([[f, sha256_file(root / f)] for f in files]))

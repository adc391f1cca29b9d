"""``convert``: export, quantise and gate every requested variant, then build the bundle.

Per target, the fp32 variant is built and gated first (it is every quantised variant's parent and
the bundle's safe fallback; if it fails, the conversion fails). Then each rung is tried: with
``--quantize auto`` the whole ladder (static int8 -> dynamic int8 -> fp16, most aggressive first),
otherwise the precisions asked for. Each rung is built, measured in its real runtime and judged;
a refused rung is recorded with the numbers that refused it. The ladder's *preferred* variant is
the first rung that passed. All passing variants go into one bundle.

Nothing is written to the registry unless the whole conversion succeeds: variants are built in a
private work directory under ``$EDGEFLEET_HOME/tmp`` (also the current and temporary directory of
the third-party tools meanwhile, so none of their files lands elsewhere), the bundle is assembled
in a staging directory that is renamed into ``artifacts/<name>/<version>/conversions/<n>`` inside
the registry transaction.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bundles.archive import pack_bundle
from bundles.canonical import canonical_json, sha256_file
from bundles.errors import ConfigError, ConversionError, EdgeFleetError, GateFailedError
from bundles.manifest import Manifest, Variant
from converter.build_context import BuildContext
from converter.bundle_build import (
    features_and_baseline,
    golden_batch,
    golden_for,
    golden_rows,
    make_manifest,
    variant_entry,
)
from converter.context import about
from converter.datasets import Dataset, load_dataset
from converter.exporters import BuiltVariant, exporter_for
from converter.gates import Measurement, Reference, dynamic_extremes, judge, latency_ratios, measure, reference_for
from converter.home import publish_dir, scratch_dir, staging_dir
from converter.quantize import EXTRA_PRECISIONS, PRECISIONS
from converter.register import tool_versions
from converter.registry import Conversion, ConversionRow, ModelVersion, Registry, utc_now
from converter.sources import SourceModel, load_source

Progress = Callable[[str], None]


@dataclass
class RungResult:
    """One rung of one target: built and measured (or not), passed or refused, and why."""

    variant_id: str
    target: str
    precision: str
    status: str  # passed | refused
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Findings a passing variant was kept despite (``--prefer size``)."""

    def to_dict(self) -> dict[str, Any]:
        return {"variant_id": self.variant_id, "target": self.target, "precision": self.precision,
                "status": self.status, "reasons": self.reasons, "notes": self.notes,
                "metrics": self.metrics}  # fmt: skip


@dataclass
class Outcome:
    """What a conversion produced."""

    model: ModelVersion
    conversion: Conversion
    results: list[RungResult]
    manifest: Manifest
    bundle_path: Path


def parse_quantize(text: str) -> tuple[str, ...] | None:
    """``auto`` -> None (the whole ladder); else the named precisions, each checked."""
    if text.strip() == "auto":
        return None
    chosen = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    known = PRECISIONS + EXTRA_PRECISIONS
    unknown = [p for p in chosen if p not in known]
    if unknown or not chosen:
        raise ConfigError(f"--quantize: '{text}' is not 'auto' or a list of {', '.join(known)}")
    return chosen


@dataclass
class _Run:
    """State of one conversion in progress."""

    model: ModelVersion
    source: SourceModel
    data: Dataset
    reference: Reference
    ctx: BuildContext
    progress: Progress
    results: list[RungResult] = field(default_factory=list)
    passed: list[tuple[BuiltVariant, Measurement]] = field(default_factory=list)
    targets: tuple[str, ...] = ()


def convert(registry: Registry, name: str, version: int | None, targets: tuple[str, ...],
            quantize: tuple[str, ...] | None, progress: Progress | None = None) -> Outcome:  # fmt: skip
    """Convert a registered version; see the module docstring."""
    model = registry.get(name, version)
    exporters = [exporter_for(t) for t in targets]
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    with scratch_dir(registry.home, f"convert-{model.name}-") as work:
        run = _prepare(registry, model, work, say)
        run.targets = targets
        for exporter in exporters:
            _convert_target(run, exporter, quantize, work / "variants")
        say("building the bundle")
        options = {"targets": list(targets), "quantize": "auto" if quantize is None else list(quantize)}
        return _finish(registry, run, options, time.perf_counter() - started)


def _prepare(registry: Registry, model: ModelVersion, work: Path, say: Progress) -> _Run:
    artifacts = registry.home.artifacts_dir(model.name, model.version)
    spec = model.spec
    with about(model.ref, "source"):
        say("loading the source model and data")
        data = load_dataset(artifacts / model.eval_file, spec.inputs, spec.label_key, "eval file")
        calibration = None
        if model.calibration_file:
            calibration = load_dataset(
                artifacts / model.calibration_file, spec.inputs, spec.label_key, "calibration file"
            )
        source = load_source(model.source_kind, [artifacts / f for f in model.source_files], spec)
        reference = reference_for(source.predict, data, spec)
    ctx = BuildContext(name=model.name, spec=spec, source=source, calibration=calibration, work_dir=work)
    return _Run(model=model, source=source, data=data, reference=reference, ctx=ctx, progress=say)


def _convert_target(run: _Run, exporter: ModuleType, quantize: tuple[str, ...] | None, work: Path) -> None:
    ladder: tuple[str, ...] = exporter.PRECISIONS
    wanted = ladder if quantize is None else quantize
    for precision in wanted:
        if precision not in ladder + EXTRA_PRECISIONS:
            raise ConfigError(f"model {run.model.ref}: target {exporter.TARGET} cannot build precision {precision}")
    parent = _rung(run, exporter, "fp32", None, work)
    if parent is None:
        return
    for precision in (p for p in wanted if p != "fp32"):
        _rung(run, exporter, precision, parent, work)
    _mark_preferred(run, exporter.TARGET, ladder)


def _rung(run: _Run, exporter: ModuleType, precision: str, parent: Measurement | None,
          work: Path) -> Measurement | None:  # fmt: skip
    """Build, measure and judge one variant; returns its measurement when it passed."""
    variant_id = f"{exporter.TARGET}-{precision}"
    run.progress(f"{variant_id}: building and measuring")
    spec = run.model.spec
    try:
        with about(run.model.ref, variant_id):
            built: BuiltVariant = exporter.build(run.ctx, precision, work / variant_id)
            if parent is None:
                exporter.open_runner(built)  # throwaway load: one-time runtime set-up is not charged to fp32's memory
            measured = measure(built, exporter.open_runner, run.data, run.reference, spec)
            _compare_with_parent(run, measured, parent)
            if any(t.dim_ranges for t in spec.inputs):
                assert measured.runner is not None
                measured.metrics["dynamic_extremes"] = dynamic_extremes(
                    measured.runner, run.source.predict, run.data, spec
                )
    except ConversionError as e:
        if parent is None:  # the fp32 parent must build: without it there is nothing to publish for this target
            raise
        run.results.append(RungResult(variant_id, exporter.TARGET, precision, "refused", [_cause(e, variant_id)]))
        return None
    verdict = judge(built, measured.metrics, spec, None if parent is None else parent.metrics)
    if verdict.reasons and parent is None:
        raise GateFailedError(f"model {run.model.ref}, variant {variant_id}: {'; '.join(verdict.reasons)}")
    _record(run, built, measured, verdict.reasons, verdict.notes)
    return measured if not verdict.reasons else None


def _compare_with_parent(run: _Run, measured: Measurement, parent: Measurement | None) -> None:
    if parent is None or parent.runner is None or measured.runner is None:
        return
    measured.metrics.update(latency_ratios(parent.runner, measured.runner, run.data, run.model.spec))
    measured.metrics["size_ratio_to_fp32"] = measured.metrics["size_bytes"] / parent.metrics["size_bytes"]


def _record(run: _Run, built: BuiltVariant, measured: Measurement, reasons: list[str], notes: list[str]) -> None:
    status = "refused" if reasons else "passed"
    measured.metrics["gates"] = _budgets_checked(run.model)
    measured.metrics.setdefault("reproducible", True)
    measured.metrics.update(built.details)
    if built.precision == "fp32":
        measured.metrics["size_ratio_to_fp32"] = 1.0
    metrics = _persistable(measured.metrics)
    result = RungResult(built.id, built.target, built.precision, status, reasons, metrics, notes)
    run.results.append(result)
    if not reasons:
        run.passed.append((built, measured))
    if built.precision != "fp32":
        measured.runner = None  # only parents stay loaded


def _budgets_checked(model: ModelVersion) -> dict[str, Any]:
    """The budgets the variant was judged by, the metric's default drop made explicit."""
    spec = model.spec
    budgets = spec.budgets.to_dict()
    budgets["max_drop"], budgets["max_drop_relative"] = spec.budgets.drop_budget(spec.metric_name)
    return {key: value for key, value in sorted(budgets.items()) if value is not None}


def _persistable(metrics: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(metrics, default=float))  # type: ignore[no-any-return]


def _cause(error: EdgeFleetError, variant_id: str) -> str:
    text = str(error)
    marker = f"variant {variant_id}: "
    return text.split(marker, 1)[1] if marker in text else text


def _mark_preferred(run: _Run, target: str, ladder: tuple[str, ...]) -> None:
    passing = {r.precision: r for r in run.results if r.target == target and r.status == "passed"}
    for rank, precision in enumerate(ladder):
        if precision in passing:
            passing[precision].metrics["ladder_rank"] = rank
    for precision in ladder:
        if precision in passing:
            passing[precision].metrics["preferred"] = True
            return


def _finish(registry: Registry, run: _Run, options: dict[str, Any], duration_s: float) -> Outcome:
    model = run.model
    home = registry.home
    with staging_dir(home.artifacts_dir(model.name, model.version) / "conversions" / "staging") as staging:
        manifest = _assemble(run, staging / "bundle", options)
        bundle = pack_bundle(staging / "bundle", manifest, staging / f"{model.name}-{model.version}.efb")
        results = [r.to_dict() for r in run.results]
        (staging / "results.json").write_bytes(canonical_json({"results": results, "duration_s": duration_s}))
        return _insert_conversion(registry, run, staging, bundle.name, options, manifest)


def _assemble(run: _Run, bundle_dir: Path, options: dict[str, Any]) -> Manifest:
    """Copy passing variants under ``bundle_dir/variants/<id>/``, compute golden and baseline, write the manifest."""
    by_id = {r.variant_id: r for r in run.results}
    entries: list[Variant] = []
    for built, _ in run.passed:
        shutil.copytree(built.directory, bundle_dir / "variants" / built.id)
    golden = _golden(run)
    for built, _ in _publish_order(run):
        metrics = dict(by_id[built.id].metrics)
        metrics["golden_atol"] = golden.tolerance_for(built.id)[0]
        entries.append(variant_entry(built, bundle_dir, metrics))
    features, baseline = features_and_baseline(run.data, run.reference, run.model)
    manifest = make_manifest(run.model, entries, run.reference, golden, features, baseline, tool_versions(), options)
    Manifest.from_bytes(manifest.to_bytes())  # validate what we are about to sign
    (bundle_dir / "manifest.json").write_bytes(manifest.to_bytes())
    return manifest


def _publish_order(run: _Run) -> list[tuple[BuiltVariant, Measurement]]:
    """Per target in request order: preferred first, then ladder order (fp32 last)."""
    by_id = {r.variant_id: r for r in run.results}

    def key(item: tuple[BuiltVariant, Measurement]) -> tuple[int, int, int]:
        built = item[0]
        metrics = by_id[built.id].metrics
        target_rank = run.targets.index(built.target) if built.target in run.targets else 0
        return (target_rank, 0 if metrics.get("preferred") else 1, metrics.get("ladder_rank", 99))

    return sorted(run.passed, key=key)


def _golden(run: _Run) -> Any:
    batch = golden_batch(run.model)
    outputs = {built.id: measured.outputs for built, measured in run.passed}
    chosen = golden_rows(run.reference, list(outputs.values()), run.data.rows)
    fp32_ids = [built.id for built, _ in run.passed if built.precision == "fp32"]
    return golden_for(run.data, run.reference, chosen, outputs, fp32_ids, batch)


def _insert_conversion(registry: Registry, run: _Run, staging: Path, bundle_name: str, options: dict[str, Any],
                       manifest: Manifest) -> Outcome:  # fmt: skip
    final: Path | None = None
    try:
        with registry.transaction() as session:
            number = registry.next_conversion_number(session, run.model)
            row = ConversionRow(
                model_version_id=run.model.id, number=number, created_at=utc_now(),
                options_json=json.dumps(options), results_json=json.dumps([r.to_dict() for r in run.results]),
                bundle_file=bundle_name, bundle_sha256=sha256_file(staging / bundle_name),
            )  # fmt: skip
            session.add(row)
            session.flush()
            final = registry.home.conversion_dir(run.model.name, run.model.version, number)
            publish_dir(staging, final)
            conversion = Conversion.from_row(row)
    except BaseException:
        if final is not None:
            shutil.rmtree(final, ignore_errors=True)
        raise
    return Outcome(run.model, conversion, run.results, manifest, final / bundle_name)

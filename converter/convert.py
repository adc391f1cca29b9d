"""``convert``: export, quantise and gate every requested variant, then build the bundle.

Per target, the fp32 variant is built and gated first (it is every quantised variant's parent and
the bundle's safe fallback). A target whose fp32 cannot be built (a source it cannot take, an
operator its converter cannot lower) or passes on no runtime is refused with that reason and the
other targets go on; the conversion fails only when no target is left. Then each rung is tried:
with ``--quantize auto`` the target's whole ladder (most aggressive first), otherwise the
precisions asked for (a precision the target has no recipe for is a refused rung). Each rung is
built, then measured and judged on every runtime of its target (``exporter.RUNTIMES``: LiteRT and
the old tflite-runtime for TFLite), against the fp32 parent *on the same runtime*; it is published
when it passes on at least one, and its requirements list exactly those runtimes and versions.
A target no runtime of this host can execute (Core ML off macOS) is validated structurally and
its variants are ``structural``. A refused rung is recorded with the numbers that refused it.
The ladder's *preferred* variant is the first rung that passed. All passing variants go into one
bundle; every executed variant is compared with the source and with every other
(:mod:`converter.agreement`) for the report.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from bundles.archive import pack_bundle
from bundles.canonical import canonical_json, sha256_file
from bundles.errors import (
    ConfigError,
    ConversionError,
    EdgeFleetError,
    GateFailedError,
    InferenceError,
    RuntimeUnavailableError,
)
from bundles.manifest import Manifest, ValidatedRuntime, Variant
from converter.agreement import Executed, agreement_report
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
from converter.exporters import BuiltVariant, Runner, exporter_for
from converter.gates import (
    Measurement,
    Reference,
    dynamic_extremes,
    judge,
    judge_structure,
    latency_ratios,
    measure,
    reference_for,
)
from converter.home import publish_dir, scratch_dir, staging_dir
from converter.quantize import EXTRA_PRECISIONS
from converter.register import tool_versions
from converter.registry import Conversion, ConversionRow, ModelVersion, Registry, utc_now
from converter.sources import SourceModel, load_source

Progress = Callable[[str], None]


@dataclass
class RungResult:
    """One rung of one target: built and measured (or not), passed, structural or refused, and why.

    ``runtimes`` has one entry per runtime the target is gated on (``status`` passed, refused or
    unavailable, its version, reasons and the parity figures measured there); ``metrics`` are the
    primary runtime's (the first one the variant passed on).
    """

    variant_id: str
    target: str
    precision: str
    status: str  # passed | structural | refused
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Findings a published variant was kept despite (``--prefer size``, a runtime that refused it)."""
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"variant_id": self.variant_id, "target": self.target, "precision": self.precision,
                "status": self.status, "reasons": self.reasons, "notes": self.notes,
                "metrics": self.metrics, "runtimes": self.runtimes}  # fmt: skip


@dataclass
class Outcome:
    """What a conversion produced."""

    model: ModelVersion
    conversion: Conversion
    results: list[RungResult]
    manifest: Manifest
    bundle_path: Path


def parse_quantize(text: str, targets: tuple[str, ...] = ("onnx",)) -> tuple[str, ...] | None:
    """``auto`` -> None (every target's whole ladder); else the named precisions, each known to a target."""
    if text.strip() == "auto":
        return None
    chosen = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    known = tuple(dict.fromkeys(p for t in targets for p in _ladder(exporter_for(t)) + _extra(exporter_for(t))))
    unknown = [p for p in chosen if p not in known]
    if unknown or not chosen:
        raise ConfigError(f"--quantize: '{text}' is not 'auto' or a list of {', '.join(known)}")
    return chosen


def _ladder(exporter: ModuleType) -> tuple[str, ...]:
    ladder: tuple[str, ...] = exporter.PRECISIONS
    return ladder


def _extra(exporter: ModuleType) -> tuple[str, ...]:
    extra: tuple[str, ...] = getattr(exporter, "EXTRA_PRECISIONS", EXTRA_PRECISIONS)
    return extra


def _runtimes(exporter: ModuleType) -> tuple[str, ...]:
    runtimes: tuple[str, ...] = getattr(exporter, "RUNTIMES", (exporter.RUNTIME,))
    return runtimes


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
    executed: list[Executed] = field(default_factory=list)
    """Every variant run on every runtime (refused ones too), for the cross-target agreement."""
    target_errors: list[EdgeFleetError] = field(default_factory=list)
    """Why whole targets were refused (their fp32 could not be built or passed nowhere)."""


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
        try:
            for exporter in exporters:
                _convert_target(run, exporter, quantize, work / "variants")
        finally:
            run.ctx.close()
        if not run.passed:
            raise run.target_errors[0]
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
    ladder = _ladder(exporter)
    wanted = ladder if quantize is None else quantize
    parents = _rung(run, exporter, "fp32", None, work)
    if parents is None:
        return
    for precision in (p for p in wanted if p != "fp32"):
        if precision not in ladder + _extra(exporter):
            reason = f"{exporter.TARGET} has no {precision} recipe (its precisions: {', '.join(ladder)})"
            run.results.append(RungResult(f"{exporter.TARGET}-{precision}", exporter.TARGET, precision, "refused",
                                          [reason]))  # fmt: skip
            continue
        _rung(run, exporter, precision, parents, work)
    _mark_preferred(run, exporter.TARGET, ladder)


@dataclass
class _OnRuntime:
    """One variant gated on one runtime."""

    runtime: str
    status: str  # passed | refused | unavailable
    version: str = ""
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measured: Measurement | None = None
    error: EdgeFleetError | None = None
    """The error that stopped the measurement (the conversion's error type when it was the fp32 parent)."""

    def label(self) -> str:
        return f"{self.runtime} {self.version}".strip()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "version": self.version, "reasons": self.reasons}
        if self.measured is not None:
            out.update({k: self.measured.metrics.get(k) for k in _RUNTIME_SUMMARY if k in self.measured.metrics})
        return out


_RUNTIME_SUMMARY = (
    "max_abs_error",
    "cosine",
    "top1_agreement",
    "metric_value",
    "metric_drop",
    "latency_b1_p50_ms",
    "latency_batch_p50_ms",
    "latency_ratio_b1_to_fp32",
    "latency_ratio_to_fp32",
)
_STRUCTURAL = "structural"
"""Key of the parents map under which a target no runtime here can execute keeps its fp32 structure."""


def _rung(run: _Run, exporter: ModuleType, precision: str, parents: dict[str, Measurement] | None,
          work: Path) -> dict[str, Measurement] | None:  # fmt: skip
    """Build one variant and gate it on every runtime of its target; the runtimes it passed on, or None."""
    variant_id = f"{exporter.TARGET}-{precision}"
    run.progress(f"{variant_id}: building and measuring")
    try:
        with about(run.model.ref, variant_id):
            built: BuiltVariant = exporter.build(run.ctx, precision, work / variant_id)
    except ConversionError as e:
        run.results.append(RungResult(variant_id, exporter.TARGET, precision, "refused", [_cause(e, variant_id)]))
        if parents is None:  # no fp32: the target is refused, the others go on
            run.target_errors.append(e)
        return None
    outcomes = [_on_runtime(run, exporter, built, runtime, parents) for runtime in _runtimes(exporter)]
    if all(o.status == "unavailable" for o in outcomes) and hasattr(exporter, "check_structure"):
        return _structural(run, exporter, built, outcomes, parents)
    return _conclude(run, exporter, built, outcomes, parents)


def _on_runtime(run: _Run, exporter: ModuleType, built: BuiltVariant, runtime: str,
                parents: dict[str, Measurement] | None) -> _OnRuntime:  # fmt: skip
    """Measure and judge ``built`` on ``runtime`` (unavailable when this host cannot run it)."""
    try:
        version = exporter.runtime_version(runtime, run.ctx)
    except RuntimeUnavailableError as e:
        return _OnRuntime(runtime, "unavailable", reasons=[str(e)])
    parent = None if parents is None else parents.get(runtime)
    if parents is not None and parent is None:
        return _OnRuntime(runtime, "unavailable", version, [f"its fp32 parent did not pass on {runtime} {version}"])
    outcome = _OnRuntime(runtime, "refused", version)
    spec = run.model.spec
    try:
        with about(run.model.ref, built.id):
            measured = _measure_on(run, exporter, built, runtime, parent)
    except (ConversionError, InferenceError) as e:
        outcome.reasons.append(_cause(e, built.id))
        outcome.error = e if isinstance(e, ConversionError) else ConversionError(str(e))
        return outcome
    outcome.measured = measured
    verdict = judge(built, measured.metrics, spec, None if parent is None else parent.metrics)
    outcome.reasons, outcome.notes = verdict.reasons, verdict.notes
    outcome.status = "refused" if verdict.reasons else "passed"
    run.executed.append(Executed(built.id, runtime, version, measured.outputs, outcome.status))
    return outcome


def _measure_on(run: _Run, exporter: ModuleType, built: BuiltVariant, runtime: str,
                parent: Measurement | None) -> Measurement:  # fmt: skip
    spec = run.model.spec

    def open_runner(variant: BuiltVariant) -> Runner:
        runner: Runner = exporter.open_runner(variant, runtime, run.ctx)
        return runner

    if parent is None:
        _release(open_runner(built))  # throwaway load: one-time runtime set-up is not charged to fp32's memory
    try:
        measured = measure(built, open_runner, run.data, run.reference, spec)
    except RuntimeUnavailableError as e:  # the runtime is here but refuses this file (its words say which)
        raise ConversionError(str(e) if runtime in str(e) else f"{runtime} cannot load it: {e}") from e
    _compare_with_parent(run, measured, parent)
    if any(t.dim_ranges for t in spec.inputs):
        assert measured.runner is not None
        measured.metrics["dynamic_extremes"] = dynamic_extremes(measured.runner, run.source.predict, run.data, spec)
    return measured


def _release(runner: Any) -> None:
    close = getattr(runner, "close", None)
    if callable(close):
        close()


def _conclude(run: _Run, exporter: ModuleType, built: BuiltVariant, outcomes: list[_OnRuntime],
              parents: dict[str, Measurement] | None) -> dict[str, Measurement] | None:  # fmt: skip
    """Record the variant: published when it passed on at least one runtime, validated for those."""
    several = len(outcomes) > 1
    passing = [o for o in outcomes if o.status == "passed"]
    for outcome in outcomes:
        keep = parents is None and outcome.status == "passed"  # fp32 runners stay loaded: the children's timings
        if outcome.measured is not None and not keep:
            _release(outcome.measured.runner)
            outcome.measured.runner = None
    if not passing:
        reasons = [f"{o.label()}: {r}" if several else r for o in outcomes for r in o.reasons]
        _record(run, built, next((o.measured for o in outcomes if o.measured), None), "refused", reasons, [],
                outcomes)  # fmt: skip
        if parents is None:
            text = f"model {run.model.ref}, variant {built.id}: {'; '.join(reasons)}"
            failed = next((o.error for o in outcomes if o.error is not None), None)
            run.target_errors.append(type(failed)(text) if failed is not None else GateFailedError(text))
        return None
    primary = passing[0]
    if getattr(exporter, "VALIDATED_RUNTIMES_BIND", False):
        built.requirements = replace(
            built.requirements, runtime=primary.runtime, min_runtime_version=primary.version,
            validated_runtimes=tuple(ValidatedRuntime(o.runtime, o.version) for o in passing),
        )  # fmt: skip
    notes = [f"{primary.label()}: {n}" if several else n for n in primary.notes]
    notes += [f"not validated on {o.label()}: {'; '.join(o.reasons)}" for o in outcomes if o.status != "passed"]
    assert primary.measured is not None
    _record(run, built, primary.measured, "passed", [], notes, outcomes)
    if parents is not None:
        return None
    return {o.runtime: o.measured for o in passing if o.measured is not None}


def _structural(run: _Run, exporter: ModuleType, built: BuiltVariant, outcomes: list[_OnRuntime],
                parents: dict[str, Measurement] | None) -> dict[str, Measurement] | None:  # fmt: skip
    """No runtime of this host can execute the target: validate the variant's structure only."""
    parent = None if parents is None else parents.get(_STRUCTURAL)
    with about(run.model.ref, built.id):
        metrics, reasons = exporter.check_structure(built, run.ctx, None if parent is None else parent.metrics)
    reasons = reasons + judge_structure(metrics, run.model.spec, None if parent is None else parent.metrics)
    metrics["size_ratio_to_fp32"] = 1.0 if parent is None else metrics["size_bytes"] / parent.metrics["size_bytes"]
    notes = [f"structurally valid, not executed on this host ({'; '.join(o.reasons)})" for o in outcomes[:1]]
    measured = Measurement(metrics=metrics)
    _record(run, built, measured, "refused" if reasons else "structural", reasons, [] if reasons else notes,
            outcomes)  # fmt: skip
    if reasons and parents is None:
        run.target_errors.append(GateFailedError(f"model {run.model.ref}, variant {built.id}: {'; '.join(reasons)}"))
    return {_STRUCTURAL: measured} if parents is None and not reasons else None


def _compare_with_parent(run: _Run, measured: Measurement, parent: Measurement | None) -> None:
    if parent is None or parent.runner is None or measured.runner is None:
        return
    measured.metrics.update(latency_ratios(parent.runner, measured.runner, run.data, run.model.spec))
    measured.metrics["size_ratio_to_fp32"] = measured.metrics["size_bytes"] / parent.metrics["size_bytes"]


def _record(run: _Run, built: BuiltVariant, measured: Measurement | None, status: str, reasons: list[str],
            notes: list[str], outcomes: list[_OnRuntime]) -> None:  # fmt: skip
    metrics: dict[str, Any] = {} if measured is None else measured.metrics
    metrics["gates"] = _budgets_checked(run.model)
    metrics.setdefault("reproducible", True)
    metrics.update(built.details)
    if built.precision == "fp32":
        metrics["size_ratio_to_fp32"] = 1.0
    if len(outcomes) > 1 or any(o.version for o in outcomes):
        metrics["runtimes"] = {o.runtime: o.summary() for o in outcomes}
    result = RungResult(built.id, built.target, built.precision, status, reasons, _persistable(metrics), notes,
                        {o.runtime: _persistable(o.summary()) for o in outcomes})  # fmt: skip
    run.results.append(result)
    if status != "refused" and measured is not None:
        run.passed.append((built, measured))


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
    passing = {r.precision: r for r in run.results if r.target == target and r.status in ("passed", "structural")}
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
        agreement = agreement_report(run.reference, run.executed, run.model.spec)
        (staging / "results.json").write_bytes(
            canonical_json({"results": results, "duration_s": duration_s, "agreement": agreement})
        )
        return insert_conversion(registry, run.model, run.results, staging, bundle.name, options, manifest)


def _assemble(run: _Run, bundle_dir: Path, options: dict[str, Any]) -> Manifest:
    """Copy passing variants under ``bundle_dir/variants/<id>/``, compute golden and baseline, write the manifest."""
    by_id = {r.variant_id: r for r in run.results}
    entries: list[Variant] = []
    for built, _ in run.passed:
        shutil.copytree(built.directory, bundle_dir / "variants" / built.id)
    golden = _golden(run)
    for built, _ in _publish_order(run):
        result = by_id[built.id]
        metrics = dict(result.metrics)
        metrics["golden_atol"] = golden.tolerance_for(built.id)[0]
        entries.append(variant_entry(built, bundle_dir, metrics, status=result.status))
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
    outputs = {built.id: measured.outputs for built, measured in run.passed if measured.outputs}
    chosen = golden_rows(run.reference, list(outputs.values()), run.data.rows)
    fp32_ids = [built.id for built, measured in run.passed if built.precision == "fp32" and measured.outputs]
    unexecuted = [built.id for built, measured in run.passed if not measured.outputs]
    return golden_for(run.data, run.reference, chosen, outputs, fp32_ids, batch, unexecuted)


def insert_conversion(registry: Registry, model: ModelVersion, results: list[RungResult], staging: Path,
                      bundle_name: str, options: dict[str, Any], manifest: Manifest) -> Outcome:  # fmt: skip
    """Record a conversion whose bundle and results are in ``staging``, and move them to their final place."""
    final: Path | None = None
    try:
        with registry.transaction() as session:
            number = registry.next_conversion_number(session, model)
            row = ConversionRow(
                model_version_id=model.id, number=number, created_at=utc_now(),
                options_json=json.dumps(options), results_json=json.dumps([r.to_dict() for r in results]),
                bundle_file=bundle_name, bundle_sha256=sha256_file(staging / bundle_name),
            )  # fmt: skip
            session.add(row)
            session.flush()
            final = registry.home.conversion_dir(model.name, model.version, number)
            publish_dir(staging, final)
            conversion = Conversion.from_row(row)
    except BaseException:
        if final is not None:
            shutil.rmtree(final, ignore_errors=True)
        raise
    return Outcome(model, conversion, results, manifest, final / bundle_name)

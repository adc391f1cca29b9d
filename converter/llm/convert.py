"""``convert`` for a language model: GGUF variants, gated against the source, in one bundle.

Flow: the registered Hugging Face directory is written as a float32 GGUF (:mod:`converter.llm.
gguf_file`); its tokenizer must split the evaluation text exactly as the source's does; the source
scores the evaluation windows once (transformers); then the float32 parent is measured and judged
(a wrong conversion, e.g. without the RoPE permutation, stops everything here, with its numbers).
With calibration text the source also yields an importance matrix (:mod:`converter.llm.imatrix`),
given to the quantiser for the k-quants, recorded with those variants and in the lineage, and kept
as ``imatrix.gguf`` in the conversion's directory. Every requested precision is written by llama.cpp's
quantiser, its effective tensor types read back, measured and judged (:mod:`converter.llm.gates`).
Passing variants go into the bundle; refused ones are recorded with the numbers that refused them.
The golden cases are fixed prompts from the evaluation text with each variant's own greedy tokens
(``expected_by_variant``): a device replays them through the same runtime version and must get the
same tokens.

The bundle is a generation bundle: task ``generation``, the tensor face of
:class:`bundles.runtimes.llama_cpp.LlamaCppRuntime`, variants of target ``gguf`` bound to the
llama-cpp-python version they were validated on, serving limits in ``runtime_config``. The float32
parent is not published (it is the measurement's reference, four times the f16 size).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from bundles.archive import pack_bundle
from bundles.canonical import canonical_json, sha256_file
from bundles.errors import ConversionError, GateFailedError
from bundles.manifest import (
    FileRef,
    Golden,
    GoldenCase,
    Lineage,
    Manifest,
    Requirements,
    RuntimeConfig,
    ValidatedRuntime,
    Variant,
)
from bundles.runtimes.llama_cpp import LlamaCppRuntime
from bundles.tensors import encode_tensor
from converter.bundle_build import manifest_metrics
from converter.convert import Outcome, RungResult, insert_conversion
from converter.home import scratch_dir, staging_dir
from converter.llm import gates
from converter.llm.gguf_file import tensor_types, write_gguf
from converter.llm.imatrix import IMATRIX_PRECISIONS, ImportanceMatrix, compute_imatrix
from converter.llm.quantize import NOMINAL_TYPES, PRECISIONS, quantize
from converter.llm.register import GENERATION_INPUTS, GENERATION_OUTPUTS, LlmSettings, settings_of
from converter.register import tool_versions
from converter.registry import ModelVersion, Registry

Progress = Callable[[str], None]
GOLDEN_PROMPTS = 3
GOLDEN_PROMPT_TOKENS = 12
GOLDEN_NEW_TOKENS = 8
_THREADS = 2
IMATRIX_FILE = "imatrix.gguf"
"""The importance matrix in llama.cpp's format, next to the bundle (``llama-quantize --imatrix`` reads it)."""


def parse_precisions(text: str) -> tuple[str, ...]:
    """``auto`` -> every GGUF precision; else the listed ones, each known."""
    if text.strip() == "auto":
        return PRECISIONS
    chosen = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in chosen if p not in PRECISIONS]
    if unknown or not chosen:
        raise ConversionError(f"--quantize: '{text}' is not 'auto' or a list of {', '.join(PRECISIONS)}")
    return chosen


def convert_llm(registry: Registry, model: ModelVersion, precisions: tuple[str, ...],
                progress: Progress | None = None, permute_rope: bool = True) -> Outcome:  # fmt: skip
    """Convert a registered language model; see the module docstring (``permute_rope=False`` only for tests)."""
    say = progress or (lambda _message: None)
    settings = settings_of(model)
    artifacts = registry.home.artifacts_dir(model.name, model.version)
    started = time.perf_counter()
    with scratch_dir(registry.home, f"convert-{model.name}-") as work:
        hf_dir = _source_dir(artifacts, model, work)
        say("writing the float32 GGUF")
        parent = work / "f32.gguf"
        write_gguf(hf_dir, parent, model.name, permute_rope=permute_rope)
        say("scoring the evaluation text with the source")
        source, speed_prompt = _score_source(hf_dir, parent, artifacts / model.eval_file, settings)
        results = [_gate(parent, "f32", source, speed_prompt, settings, None)]
        if results[0].status != "passed":
            raise GateFailedError(f"model {model.ref}, variant gguf-f32: {'; '.join(results[0].reasons)}")
        imatrix = _importance_matrix(hf_dir, artifacts, model, precisions, say)
        built: list[tuple[RungResult, Path]] = []
        for precision in precisions:
            say(f"gguf-{precision}: quantising and measuring")
            path = work / "variants" / f"gguf-{precision}" / "model.gguf"
            path.parent.mkdir(parents=True)
            weights = imatrix if precision in IMATRIX_PRECISIONS else None
            quantize(parent, path, precision, _THREADS, imatrix=weights)
            result = _gate(path, precision, source, speed_prompt, settings, results[0].metrics, weights)
            results.append(result)
            if result.status == "passed":
                built.append((result, path))
        if not built:
            refused = results[1:]
            detail = "; ".join(f"{r.variant_id}: {', '.join(r.reasons)}" for r in refused)
            raise GateFailedError(f"model {model.ref}: no GGUF variant passed its gates ({detail})")
        say("building the bundle")
        options = {"targets": ["gguf"], "quantize": list(precisions)}
        return _finish(registry, model, settings, results, built, source, options, time.perf_counter() - started,
                       imatrix)  # fmt: skip


def _importance_matrix(hf_dir: Path, artifacts: Path, model: ModelVersion, precisions: tuple[str, ...],
                       say: Progress) -> ImportanceMatrix | None:  # fmt: skip
    """The matrix from the registered calibration text, when there is one and a precision uses it."""
    if not model.calibration_file or not any(p in IMATRIX_PRECISIONS for p in precisions):
        return None
    say("computing the importance matrix from the calibration text")
    return compute_imatrix(hf_dir, artifacts / model.calibration_file)


def _source_dir(artifacts: Path, model: ModelVersion, work: Path) -> Path:
    """The registered files back in one directory (transformers and the writer read a directory)."""
    hf_dir = work / "source"
    hf_dir.mkdir()
    for relative in model.source_files:
        shutil.copyfile(artifacts / relative, hf_dir / Path(relative).name)
    return hf_dir


def _score_source(hf_dir: Path, parent: Path, eval_file: Path, settings: LlmSettings) -> tuple[gates.SourceScores,
                                                                                              list[int]]:  # fmt: skip
    text = eval_file.read_text(encoding="utf-8")
    ids, bos = gates.gguf_token_ids(parent, text)
    mismatch = gates.tokenizer_mismatch(ids, gates.source_token_ids(hf_dir, text))
    if mismatch:
        raise GateFailedError(f"variant gguf-f32: {mismatch}")
    budgets = settings.budgets
    windows = gates.eval_windows(ids, bos, budgets.window, budgets.max_eval_tokens)
    if not windows:
        raise ConversionError("the evaluation text is too short to score (fewer than two tokens)")
    return gates.source_scores(hf_dir, windows), windows[0][:16]


def _gate(path: Path, precision: str, source: gates.SourceScores, speed_prompt: list[int], settings: LlmSettings,
          parent: dict[str, Any] | None, imatrix: ImportanceMatrix | None = None) -> RungResult:  # fmt: skip
    figures = gates.measure(path, source, _THREADS, speed_prompt)
    figures["tensor_types"] = tensor_types(path)
    if imatrix is not None:
        figures["imatrix"] = imatrix.summary()
    reasons = gates.judge(precision, figures, settings.budgets)
    nominal = NOMINAL_TYPES.get(precision)
    if nominal is not None and nominal not in figures["tensor_types"]:
        reasons.append(f"no tensor was written as {nominal} (llama.cpp fell back to {figures['tensor_types']})")
    if parent is not None:
        figures["size_ratio_to_f32"] = figures["size_bytes"] / parent["size_bytes"]
        figures["tokens_per_s_ratio_to_f32"] = figures["tokens_per_s"] / parent["tokens_per_s"]
    figures["gates"] = settings.budgets.describe(precision)
    status = "refused" if reasons else "passed"
    return RungResult(f"gguf-{precision}", "gguf", precision, status, reasons, json.loads(json.dumps(figures)))


def _finish(registry: Registry, model: ModelVersion, settings: LlmSettings, results: list[RungResult],
            built: list[tuple[RungResult, Path]], source: gates.SourceScores, options: dict[str, Any],
            duration_s: float, imatrix: ImportanceMatrix | None) -> Outcome:  # fmt: skip
    home = registry.home
    with staging_dir(home.artifacts_dir(model.name, model.version) / "conversions" / "staging") as staging:
        bundle_dir = staging / "bundle"
        lineage = _lineage(model)
        if imatrix is not None:
            imatrix.write_gguf(staging / IMATRIX_FILE, model.calibration_file)
            lineage.extra["imatrix"] = {**imatrix.summary(), "file_sha256": sha256_file(staging / IMATRIX_FILE)}
        manifest = _assemble(model, settings, built, source, bundle_dir, lineage)
        bundle = pack_bundle(bundle_dir, manifest, staging / f"{model.name}-{model.version}.efb")
        payload = {"results": [r.to_dict() for r in results], "duration_s": duration_s, "agreement": {}}
        (staging / "results.json").write_bytes(canonical_json(payload))
        return insert_conversion(registry, model, results, staging, bundle.name, options, manifest)


def _assemble(model: ModelVersion, settings: LlmSettings, built: list[tuple[RungResult, Path]],
              source: gates.SourceScores, bundle_dir: Path, lineage: Lineage) -> Manifest:  # fmt: skip
    version = metadata.version("llama-cpp-python")
    variants, expected = [], {}
    for result, path in sorted(built, key=lambda item: item[1].stat().st_size):
        relative = f"variants/{result.variant_id}/model.gguf"
        (bundle_dir / relative).parent.mkdir(parents=True)
        shutil.copyfile(path, bundle_dir / relative)
        expected[result.variant_id] = _greedy_golden(path, source)
        requirements = Requirements(runtime="llama_cpp", min_runtime_version=version,
                                    validated_runtimes=(ValidatedRuntime("llama_cpp", version),))  # fmt: skip
        files = (FileRef(relative, sha256_file(bundle_dir / relative), (bundle_dir / relative).stat().st_size),)
        metrics = manifest_metrics(_stable(result))
        variants.append(Variant(id=result.variant_id, target="gguf", precision=result.precision, entry=relative,
                                files=files, requirements=requirements, metrics=metrics))  # fmt: skip
    manifest = Manifest(
        name=model.name, version=model.version, created_at=model.created_at, task="generation",
        inputs=GENERATION_INPUTS, outputs=GENERATION_OUTPUTS, variants=tuple(variants),
        golden=_golden(source, expected), lineage=lineage, runtime_config=_runtime_config(model, settings),
    )  # fmt: skip
    Manifest.from_bytes(manifest.to_bytes())
    (bundle_dir / "manifest.json").write_bytes(manifest.to_bytes())
    return manifest


_TIMINGS = ("ttft_ms", "tokens_per_s", "tokens_per_s_ratio_to_f32")


def _stable(result: RungResult) -> dict[str, Any]:
    """The variant's figures without timings (the manifest's bytes depend only on the inputs)."""
    return {k: v for k, v in result.metrics.items() if k not in _TIMINGS}


def _golden_prompts(source: gates.SourceScores) -> list[list[int]]:
    return [w[:GOLDEN_PROMPT_TOKENS] for w in source.windows[:GOLDEN_PROMPTS]]


def _greedy_golden(path: Path, source: gates.SourceScores) -> list[list[int]]:
    """The variant's own greedy tokens for every golden prompt, from the same runtime devices use."""
    runtime = LlamaCppRuntime.load(path, threads=_THREADS, context=GOLDEN_PROMPT_TOKENS + GOLDEN_NEW_TOKENS + 8)
    try:
        budget = np.asarray([GOLDEN_NEW_TOKENS], dtype=np.int32)
        return [
            runtime.run({"tokens": np.asarray([p], dtype=np.int32), "max_new_tokens": budget})["generated"][0].tolist()
            for p in _golden_prompts(source)
        ]
    finally:
        runtime.close()


def _golden(source: gates.SourceScores, expected: dict[str, list[list[int]]]) -> Golden:
    cases = []
    first = next(iter(expected))
    for index, prompt in enumerate(_golden_prompts(source)):

        def tokens(ids: list[int]) -> Any:
            return encode_tensor(np.asarray([ids], dtype=np.int32))

        per_variant = {vid: {"generated": tokens(runs[index]).to_dict()} for vid, runs in expected.items()}
        cases.append(GoldenCase(
            inputs={"tokens": tokens(prompt), "max_new_tokens": encode_tensor(np.asarray([GOLDEN_NEW_TOKENS],
                                                                                          dtype=np.int32))},
            expected={"generated": tokens(expected[first][index])},
            extra={"expected_by_variant": per_variant},
        ))  # fmt: skip
    return Golden(cases=tuple(cases), atol=0.0, rtol=0.0)


def _lineage(model: ModelVersion) -> Lineage:
    return Lineage(source_sha256=model.source_sha256, calibration_sha256=model.calibration_sha256,
                   eval_sha256=model.eval_sha256, registry_version=model.version, tool_versions=_tools(),
                   extra={"source_kind": model.source_kind})  # fmt: skip


def _tools() -> dict[str, str]:
    found = tool_versions()
    for dist in ("llama-cpp-python", "gguf", "transformers", "sentencepiece"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return dict(sorted(found.items()))


def _runtime_config(model: ModelVersion, settings: LlmSettings) -> RuntimeConfig:
    limits = {"max_prompt_tokens": settings.max_prompt_tokens, "max_new_tokens": settings.max_new_tokens,
              "max_generation_s": settings.max_generation_s}  # fmt: skip
    return RuntimeConfig(threads=_THREADS, deterministic=False, deadline_ms=model.spec.serving.deadline_ms,
                         extra={"llm": limits})  # fmt: skip

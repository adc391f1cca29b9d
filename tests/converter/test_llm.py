"""The language-model path of the converter on the tiny Llama: GGUF variants gated against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundles.archive import open_bundle
from bundles.errors import GateFailedError
from bundles.predictor import Predictor
from converter.home import Home
from converter.llm.convert import convert_llm
from converter.llm.gguf_file import permute_for_rope
from converter.registry import Registry
from tests.conftest import ConvertedLlm
from tests.converter.helpers import cli, ok


def _results(converted: ConvertedLlm) -> dict[str, dict]:
    return {r["variant_id"]: r for r in json.loads(converted.results_json.read_text())["results"]}


def test_every_precision_passes_its_gates_measured_against_transformers(tiny_llm: ConvertedLlm) -> None:
    results = _results(tiny_llm)
    assert [r["status"] for r in results.values()] == ["passed"] * 4
    q8, q4 = results["gguf-q8_0"]["metrics"], results["gguf-q4_k_m"]["metrics"]
    assert 0 < q8["kl_mean"] <= 0.005 and q8["gates"]["max_kl"] == 0.005
    assert 0 < q4["kl_mean"] <= 0.05 and q4["top1_agreement"] >= 0.9
    assert q8["kl_mean"] < q4["kl_mean"]  # the measurement sees quantisation error, more of it at 4 bits
    assert results["gguf-f32"]["metrics"]["kl_mean"] < 1e-4
    assert 0.95 < q4["ppl_ratio"] < 1.1 and q4["tokens_per_s"] > 0 and q4["ttft_ms"] > 0


def test_effective_tensor_types_are_read_back_from_each_file(tiny_llm: ConvertedLlm) -> None:
    results = _results(tiny_llm)
    assert results["gguf-f16"]["metrics"]["tensor_types"] == {"F16": 16, "F32": 5}
    assert results["gguf-q8_0"]["metrics"]["tensor_types"] == {"F32": 5, "Q8_0": 16}
    assert results["gguf-q4_k_m"]["metrics"]["tensor_types"] == {"F32": 5, "Q4_K": 13, "Q6_K": 3}


def test_the_bundle_holds_the_passing_variants_smallest_first_with_their_own_greedy_tokens(
    tiny_llm: ConvertedLlm, tmp_path: Path
) -> None:
    manifest, _ = open_bundle(tiny_llm.bundle, tmp_path / "b")
    assert [v.id for v in manifest.variants] == ["gguf-q4_k_m", "gguf-q8_0", "gguf-f16"]
    assert manifest.task == "generation" and manifest.runtime_config.extra["llm"]["max_new_tokens"] == 64
    sizes = {v.precision: v.size_bytes for v in manifest.variants}
    assert sizes["q4_k_m"] <= 0.35 * sizes["f16"]
    assert all(v.requirements.runtime == "llama_cpp" and v.requirements.validated_runtimes for v in manifest.variants)
    for variant in manifest.variants:
        with Predictor.load(manifest, tmp_path / "b", variant=variant.id) as predictor:
            report = predictor.self_test()
        assert report.passed and report.cases == 3


def test_the_gguf_carries_the_tokenizer_and_the_chat_template(tiny_llm: ConvertedLlm, tmp_path: Path) -> None:
    from bundles.runtimes.llama_cpp import LlamaCppRuntime

    manifest, _ = open_bundle(tiny_llm.bundle, tmp_path / "b")
    runtime = LlamaCppRuntime.load(tmp_path / "b" / manifest.variant("gguf-f16").entry)
    try:
        prompt, _ = runtime.chat_prompt([{"role": "user", "content": "Hello"}])
        assert prompt == "<|user|>\nHello\n<|assistant|>\n"
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=str(tiny_llm.source / "tokenizer.model"))
        text = "This program is free software"
        assert runtime.tokenize(text) == [1, *processor.encode(text)]
    finally:
        runtime.close()


def test_a_golden_self_test_fails_when_the_file_generates_other_tokens(tiny_llm: ConvertedLlm, tmp_path: Path) -> None:
    """A file that still loads but whose weights were changed: the output norm negated, so every logit is.

    (Swapping in another variant's file proves nothing here: on some CPUs every variant of the tiny model
    generates the same greedy tokens.)"""
    from gguf import GGUFReader

    from bundles.errors import SelfTestError

    manifest, _ = open_bundle(tiny_llm.bundle, tmp_path / "b")
    q4 = manifest.variant("gguf-q4_k_m")
    reader = GGUFReader(tmp_path / "b" / q4.entry, "r+")
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    norm.data[...] = -norm.data
    del reader, norm  # written back to the file
    predictor = Predictor.load(manifest, tmp_path / "b", variant=q4.id, verify=False)
    with predictor, pytest.raises(SelfTestError, match="golden case"):
        predictor.self_test()


def test_a_conversion_without_the_rope_permutation_is_refused_by_measurement(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    ok("register-llm", "broken", "--source", tiny_llama_dir, "--eval-text", tiny_llama_dir / "eval.txt")
    registry = Registry(Home.from_env())
    with pytest.raises(GateFailedError) as refused:
        convert_llm(registry, registry.get("broken"), ("q8_0",), permute_rope=False)
    message = str(refused.value)
    assert "variant gguf-f32: mean KL divergence" in message and "top-token agreement" in message
    assert not registry.conversions(registry.get("broken"))


def test_the_rope_permutation_interleaves_the_two_halves_of_each_head() -> None:
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads of 4 rows: halves [0 1][2 3] -> 0 2 1 3
    assert permute_for_rope(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_a_quantised_variant_that_misses_its_gate_is_refused_with_its_numbers(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    ok("register-llm", "strict", "--source", tiny_llama_dir, "--eval-text", tiny_llama_dir / "eval.txt",
       "--max-kl", "q4_k_m=0.0001")  # fmt: skip
    out = ok("convert", "strict", "--quantize", "q8_0,q4_k_m")
    assert "gguf-q4_k_m" in out and "refused" in out and "mean KL divergence" in out
    registry = Registry(Home.from_env())
    results = {r["variant_id"]: r for r in registry.latest_conversion(registry.get("strict")).results}
    assert results["gguf-q4_k_m"]["status"] == "refused" and results["gguf-q8_0"]["status"] == "passed"
    assert results["gguf-q4_k_m"]["reasons"][0].startswith("mean KL divergence 0.00")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--source", "/nonexistent"], "is not a directory"),
        (["--max-kl", "q3=0.1"], "--max-kl: 'q3=0.1' is not PRECISION=NUMBER"),
        (["--eval-text", "/etc/hostname"], "at least 500 are needed"),
    ],
)
def test_bad_registrations_get_one_line(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        args: list[str], expected: str) -> None:  # fmt: skip
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    base = {"--source": str(tiny_llama_dir), "--eval-text": str(tiny_llama_dir / "eval.txt")}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    code, _, err = cli("register-llm", "m", *[x for kv in base.items() for x in kv])
    assert code == 2 and err.count("\n") == 1 and expected in err, err

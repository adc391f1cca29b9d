"""Gates of a GGUF variant against its source, measured in the runtimes themselves.

The evaluation text is tokenised once by the GGUF file's own tokenizer (llama.cpp) and the ids are
checked against the source's tokenizer (transformers): a conversion that changed the tokenizer is
refused before any logit is compared. The ids are cut into windows of ``window`` tokens, each opened
with BOS; the source (transformers, float32) and the variant (llama-cpp-python with every position's
logits) score the same windows. Per position:

- KL divergence of the next-token distributions, KL(source || variant), averaged over positions;
- top-token agreement: how often both put the same token first;
- perplexity of the text under each, and their ratio (variant / source).

Speed is measured on the variant alone: time to first token for a fixed prompt and tokens per second
of greedy decoding after it, the median of a few runs. :func:`judge` turns the figures into reasons
to refuse (none: the variant passes) against :class:`LlmBudgets`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConversionError
from bundles.runtimes.llama_cpp import open_llama


@dataclass(frozen=True)
class LlmBudgets:
    """What a GGUF variant must achieve against the source (persisted in the registry: stable keys).

    ``max_kl`` / ``min_top1`` / ``max_ppl_ratio`` map a precision (``f32`` is the converted parent,
    gated too: a conversion that is wrong is refused there) to its bound; a precision without an
    entry has no bound on that figure.
    """

    max_kl: dict[str, float] = field(
        default_factory=lambda: {"f32": 0.001, "f16": 0.001, "q8_0": 0.005, "q4_k_m": 0.05}
    )
    min_top1: dict[str, float] = field(default_factory=lambda: {"f32": 0.99, "f16": 0.99, "q4_k_m": 0.9})
    max_ppl_ratio: dict[str, float] = field(default_factory=dict)
    max_size_bytes: int | None = None
    min_tokens_per_s: float | None = None
    window: int = 128
    max_eval_tokens: int = 1024

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlmBudgets:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def describe(self, precision: str) -> dict[str, Any]:
        """The bounds that apply to ``precision`` (for the results and the report)."""
        bounds: dict[str, Any] = {
            "max_kl": self.max_kl.get(precision), "min_top1_agreement": self.min_top1.get(precision),
            "max_ppl_ratio": self.max_ppl_ratio.get(precision), "max_size_bytes": self.max_size_bytes,
            "min_tokens_per_s": self.min_tokens_per_s,
        }  # fmt: skip
        return {k: v for k, v in bounds.items() if v is not None}


@dataclass
class SourceScores:
    """The source's log-probabilities on the evaluation windows (computed once per conversion)."""

    windows: list[list[int]]
    log_probs: list[np.ndarray]
    """Per window, float64 ``[positions, vocab]`` log-softmax of the source's logits."""

    @property
    def positions(self) -> int:
        return sum(len(w) for w in self.windows)


def eval_windows(ids: Sequence[int], bos: int, window: int, max_tokens: int) -> list[list[int]]:
    """``ids`` (at most ``max_tokens``) cut into windows of ``window`` tokens, each opened with BOS."""
    body = list(ids[:max_tokens])
    step = window - 1
    return [[bos, *body[i : i + step]] for i in range(0, len(body), step) if len(body[i : i + step]) > 1]


def source_scores(hf_dir: Path, windows: list[list[int]]) -> SourceScores:
    """The transformers model's log-probabilities on every window (float32 weights, float64 softmax)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.train(False)
    out = []
    with torch.inference_mode():
        for window in windows:
            logits = model(input_ids=torch.tensor([window])).logits[0].double()
            out.append(torch.log_softmax(logits, dim=-1).numpy())
    return SourceScores(windows, out)


def source_token_ids(hf_dir: Path, text: str) -> list[int]:
    """The source tokenizer's ids for ``text`` (no special tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def gguf_token_ids(path: Path, text: str) -> tuple[list[int], int]:
    """The GGUF tokenizer's ids for ``text`` (no BOS) and its BOS id."""
    llm = open_llama(path, n_ctx=16, vocab_only=True)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)), int(llm.token_bos())
    finally:
        llm.close()


def tokenizer_mismatch(gguf_ids: list[int], source_ids: list[int]) -> str | None:
    """Why the GGUF tokenizer differs from the source's on the evaluation text, or None."""
    if gguf_ids == source_ids:
        return None
    first = next((i for i, (a, b) in enumerate(zip(gguf_ids, source_ids, strict=False)) if a != b),
                 min(len(gguf_ids), len(source_ids)))  # fmt: skip
    return (
        f"the GGUF tokenizer splits the evaluation text differently from the source's ({len(gguf_ids)} vs "
        f"{len(source_ids)} tokens, first difference at token {first})"
    )


def measure(path: Path, source: SourceScores, threads: int, speed_prompt: list[int], speed_tokens: int = 48,
            speed_runs: int = 3) -> dict[str, Any]:  # fmt: skip
    """KL, top-1 agreement, perplexities, size, TTFT and tokens/s of the GGUF file at ``path``."""
    window = max(len(w) for w in source.windows)
    llm = open_llama(path, n_ctx=max(window, len(speed_prompt) + speed_tokens + 1), logits_all=True,
                     n_threads=threads, n_threads_batch=threads, n_batch=window, seed=0)  # fmt: skip
    try:
        figures = _parity(llm, source)
        figures.update(_speed(llm, speed_prompt, speed_tokens, speed_runs))
    except (RuntimeError, ValueError) as e:
        raise ConversionError(f"llama.cpp cannot run {path.name}: {e}") from e
    finally:
        llm.close()
    figures["size_bytes"] = path.stat().st_size
    return figures


def _parity(llm: Any, source: SourceScores) -> dict[str, Any]:
    kl_sum, hits, nll_source, nll_variant, count, predicted = 0.0, 0, 0.0, 0.0, 0, 0
    for window, reference in zip(source.windows, source.log_probs, strict=True):
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        variant = logits - _logsumexp(logits)
        kl_sum += float(np.sum(np.exp(reference) * (reference - variant)))
        hits += int(np.sum(np.argmax(reference, axis=-1) == np.argmax(variant, axis=-1)))
        count += len(window)
        following = np.asarray(window[1:])
        rows = np.arange(len(window) - 1)
        nll_source -= float(np.sum(reference[rows, following]))
        nll_variant -= float(np.sum(variant[rows, following]))
        predicted += len(following)
    ppl_source, ppl_variant = float(np.exp(nll_source / predicted)), float(np.exp(nll_variant / predicted))
    return {"kl_mean": kl_sum / count, "top1_agreement": hits / count, "ppl_source": ppl_source,
            "ppl": ppl_variant, "ppl_ratio": ppl_variant / ppl_source, "eval_positions": count}  # fmt: skip


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=-1, keepdims=True)
    total: np.ndarray = top + np.log(np.sum(np.exp(values - top), axis=-1, keepdims=True))
    return total


def _speed(llm: Any, prompt: list[int], tokens: int, runs: int) -> dict[str, Any]:
    """Median time to first token and decode tokens/s of greedy generation (end-of-text ignored)."""
    ttfts, rates = [], []
    for _ in range(runs):
        llm.reset()
        started = time.perf_counter()
        first = None
        made = 0
        for _token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            made += 1
            if first is None:
                first = time.perf_counter()
            if made >= tokens:
                break
        end = time.perf_counter()
        assert first is not None
        ttfts.append((first - started) * 1000.0)
        rates.append((made - 1) / (end - first) if end > first else float("inf"))
    return {"ttft_ms": statistics.median(ttfts), "tokens_per_s": statistics.median(rates)}


def judge(precision: str, figures: dict[str, Any], budgets: LlmBudgets) -> list[str]:
    """Reasons to refuse the variant (empty: it passes), each with the measured number and its bound."""
    reasons = []
    kl, top1, ratio = (
        budgets.max_kl.get(precision),
        budgets.min_top1.get(precision),
        budgets.max_ppl_ratio.get(precision),
    )
    if kl is not None and figures["kl_mean"] > kl:
        reasons.append(f"mean KL divergence {figures['kl_mean']:.5f} exceeds {kl}")
    if top1 is not None and figures["top1_agreement"] < top1:
        reasons.append(f"top-token agreement {figures['top1_agreement']:.4f} is below {top1}")
    if ratio is not None and figures["ppl_ratio"] > ratio:
        reasons.append(f"perplexity ratio {figures['ppl_ratio']:.4f} exceeds {ratio}")
    if budgets.max_size_bytes is not None and figures["size_bytes"] > budgets.max_size_bytes:
        reasons.append(f"size {figures['size_bytes']} bytes exceeds {budgets.max_size_bytes}")
    if budgets.min_tokens_per_s is not None and figures["tokens_per_s"] < budgets.min_tokens_per_s:
        reasons.append(f"{figures['tokens_per_s']:.1f} tokens/s is below {budgets.min_tokens_per_s}")
    return reasons

"""GGUF language models in llama.cpp, through llama-cpp-python.

Two faces. As a :class:`bundles.runtimes.base.Runtime` a model maps token ids to the ids it generates
greedily (inputs ``tokens`` int32 ``[1, n]`` and ``max_new_tokens`` int32 ``[1]``, output ``generated``
int32 ``[1, m]``): that is what the bundle's golden self-test replays, so a device checks the very
tokens the converter saw this file produce. As a generator, :meth:`LlamaCppRuntime.stream` applies the
model's own chat template (``tokenizer.chat_template`` in the file, rendered by llama-cpp-python's
Jinja2 formatter) or takes a raw prompt, and yields text pieces token by token until an end-of-
generation token, a stop string, the token limit or the wall-time limit, with a
:class:`GenerationStats` at the end (prompt and completion tokens, time to first token, tokens per
second, why it stopped).

One llama.cpp context runs one generation at a time: :meth:`LlamaCppRuntime.stream` holds the model's
lock for its whole generation and waits for it at most ``wait_s`` (then :class:`BusyError`), so
the agent's queue bounds how many wait.
"""

from __future__ import annotations

import codecs
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import BusyError, InferenceError, InputError, RuntimeUnavailableError

_OPEN_LOCK = threading.Lock()
STOP_REASONS = ("stop", "length", "time_limit")
"""Why a generation ended (persisted in telemetry): end of generation or stop string, token limit, wall time."""


@dataclass
class GenerationStats:
    """What one generation measured."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    stop_reason: str = "stop"
    tokens: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens per second after the first one (decode speed), None under two tokens."""
        if self.ttft_ms is None or self.completion_tokens < 2:
            return None
        decode_ms = self.duration_ms - self.ttft_ms
        return (self.completion_tokens - 1) / (decode_ms / 1000.0) if decode_ms > 0 else None


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``temperature`` 0 is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


class LlamaCppRuntime:
    """A GGUF file loaded in llama.cpp."""

    name = "llama_cpp"
    input_names = ("tokens", "max_new_tokens")
    output_names = ("generated",)

    def __init__(self, llm: Any, path: Path) -> None:
        self.llm, self.path = llm, path
        self._lock = threading.Lock()
        self.context_tokens: int = int(llm.n_ctx())
        self._template = llm.metadata.get("tokenizer.chat_template")
        self._formatter: Any = None

    @classmethod
    def load(cls, path: Path, threads: int = 1, accelerators: Sequence[str] = (), context: int = 0) -> LlamaCppRuntime:
        """Load ``path`` (``context`` 0: the model's own context length)."""
        del accelerators  # CPU build: GPU offload would need a llama.cpp built for it
        try:
            llm = open_llama(path, n_ctx=context, n_threads=max(1, threads), n_threads_batch=max(1, threads), seed=0)
        except (ValueError, RuntimeError) as e:
            raise RuntimeUnavailableError(f"llama.cpp cannot load {path.name}: {e}") from e
        return cls(llm, path)

    # --- the tensor face: greedy token ids, for the golden self-test ------------------------------

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = [int(t) for t in np.asarray(feeds["tokens"]).reshape(-1)]
        limit = int(np.asarray(feeds["max_new_tokens"]).reshape(-1)[0])
        stats = GenerationStats()
        for _ in self.stream_tokens(tokens, limit, Sampling(), stats=stats):
            pass
        return {"generated": np.asarray([stats.tokens], dtype=np.int32).reshape(1, -1)}

    # --- the generator face ---------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, tuple[str, ...]]:
        """The model's chat template applied to ``messages`` (and the template's own stop strings)."""
        if not self._template:
            raise InputError("this model has no chat template: use /v1/completions with a prompt")
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode("utf-8", "replace")
            bos = self.llm.detokenize([self.llm.token_bos()], special=True).decode("utf-8", "replace")
            self._formatter = Jinja2ChatFormatter(self._template, eos_token=eos, bos_token=bos)
        try:
            formatted = self._formatter(messages=list(messages))
        except Exception as e:  # a template error is the request's fault (roles the template refuses)
            raise InputError(f"the chat template cannot render these messages: {e}") from e
        stop = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop] if formatted.stop else []
        return formatted.prompt, tuple(s for s in stop if s)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's BOS (special tokens written in the text are parsed)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def stream(
        self,
        prompt: str,
        max_new_tokens: int,
        sampling: Sampling,
        stats: GenerationStats,
        stop: Sequence[str] = (),
        deadline: float | None = None,
        wait_s: float = 1.0,
    ) -> Iterator[str]:
        """Text pieces of the completion of ``prompt``; ``stats`` is filled in as it goes."""
        tokens = self.tokenize(prompt)
        if len(tokens) + 1 > self.context_tokens:
            raise InputError(f"the prompt is {len(tokens)} tokens; this model's context holds {self.context_tokens}")
        max_new = min(max_new_tokens, self.context_tokens - len(tokens))
        yield from _text_pieces(self, self.stream_tokens(tokens, max_new, sampling, stats, deadline, wait_s), stop,
                                stats)  # fmt: skip

    def stream_tokens(self, tokens: list[int], max_new_tokens: int, sampling: Sampling, stats: GenerationStats,
                      deadline: float | None = None, wait_s: float = 1.0) -> Iterator[int]:  # fmt: skip
        """Generated token ids, holding the model for the whole generation."""
        if not self._lock.acquire(timeout=wait_s):
            raise BusyError("the model is generating for another request; retry later")
        try:
            yield from self._generate(tokens, max_new_tokens, sampling, stats, deadline)
        finally:
            self._lock.release()

    def _generate(self, tokens: list[int], max_new_tokens: int, sampling: Sampling, stats: GenerationStats,
                  deadline: float | None) -> Iterator[int]:  # fmt: skip
        started = time.perf_counter()
        stats.prompt_tokens, stats.stop_reason = len(tokens), "length"
        eos = self.llm.token_eos()
        if self.llm.n_tokens:  # llama-cpp-python reuses a matching prefix; ours never must
            self.llm.reset()
        try:
            if sampling.seed is not None:
                self.llm.set_seed(sampling.seed)
            generator = self.llm.generate(
                tokens, temp=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, min_p=0.0,
                repeat_penalty=1.0, reset=True,
            )  # fmt: skip
            for token in generator:
                now = time.perf_counter()
                if stats.ttft_ms is None:
                    stats.ttft_ms = (now - started) * 1000.0
                if token == eos or _is_end_of_generation(self.llm, token):
                    stats.stop_reason = "stop"
                    break
                stats.tokens.append(int(token))
                stats.completion_tokens += 1
                yield int(token)
                if stats.stop_reason == "stop" or stats.completion_tokens >= max_new_tokens:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    stats.stop_reason = "time_limit"
                    break
        except (RuntimeError, ValueError) as e:
            raise InferenceError(f"llama.cpp failed while generating: {e}") from e
        finally:
            stats.duration_ms = (time.perf_counter() - started) * 1000.0

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if callable(close):
            close()


def _is_end_of_generation(llm: Any, token: int) -> bool:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return bool(llama_cpp.llama_vocab_is_eog(vocab, token))


def _text_pieces(runtime: LlamaCppRuntime, tokens: Iterator[int], stop: Sequence[str],
                 stats: GenerationStats) -> Iterator[str]:  # fmt: skip
    """Decoded text as it comes (whole UTF-8 characters only), cut before the first stop string."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    held = ""  # text that may be the beginning of a stop string
    for token in tokens:
        held += decoder.decode(runtime.llm.detokenize([token]))
        cut = _first_stop(held, stop)
        if cut is not None:
            stats.stop_reason = "stop"
            if held[:cut]:
                yield held[:cut]
            return
        safe = len(held) - _longest_stop_prefix(held, stop)
        if safe > 0:
            yield held[:safe]
            held = held[safe:]
    held += decoder.decode(b"", final=True)
    if held:
        yield held


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _longest_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that begins some stop string (kept back until decided)."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def extra_buffers_enabled() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (weight repacking, AMX kernels).

    ``EDGEFLEET_LLAMA_EXTRA_BUFFERS=1`` or ``0`` decides; by default they are off on CPUs that
    advertise AMX: on a virtual machine that does not enable the AMX state, llama.cpp's AMX kernels
    die with a general protection fault on the first quantised matrix product (measured on the CI
    machine), while the plain kernels compute the same logits.
    """
    setting = os.environ.get("EDGEFLEET_LLAMA_EXTRA_BUFFERS", "auto").strip().lower()
    if setting in ("0", "1"):
        return setting == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return "amx_tile" not in flags


def open_llama(path: Path, **options: Any) -> Any:
    """A ``llama_cpp.Llama`` for ``path`` (quiet), with the extra buffer types as :func:`extra_buffers_enabled` says.

    ``Llama`` builds its model parameters itself; the default-parameters function it calls is
    swapped for the length of the call (under a lock) to set ``use_extra_bufts``.
    """
    try:
        import llama_cpp.llama_cpp as native
        from llama_cpp import Llama
    except ImportError as e:
        raise RuntimeUnavailableError("llama-cpp-python is not installed (pip install 'edgefleet[llm]')") from e
    if not path.is_file():
        raise RuntimeUnavailableError(f"no model file at {path}")
    extra = extra_buffers_enabled()
    with _OPEN_LOCK:
        original = native.llama_model_default_params

        def defaults() -> Any:
            params = original()
            params.use_extra_bufts = extra
            return params

        native.llama_model_default_params = defaults
        try:
            return Llama(model_path=str(path), verbose=False, **options)
        finally:
            native.llama_model_default_params = original

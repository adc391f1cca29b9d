"""The OpenAI-compatible generation protocol, shared by the device's localhost API and the cloud endpoint.

Both serve ``POST /v1/chat/completions`` and ``POST /v1/completions`` on GGUF bundles
(:class:`bundles.runtimes.llama_cpp.LlamaCppRuntime`) with the same request checks
(:class:`GenerationRequest`: a bad body is a :class:`GenerationError`, 400), the same limits
(:class:`LlmLimits`, from the bundle's ``runtime_config.llm``), the same start of a generation
(:func:`start_generation`: template, prompt check, first piece generated before the answer starts, so
refusals keep their status codes) and the same answers (:func:`completion_json`, :func:`chunk`,
:func:`event`), each with an ``edgefleet`` object saying where it came from.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bundles.errors import GenerationError
from bundles.manifest import Manifest
from bundles.runtimes.llama_cpp import GenerationStats, LlamaCppRuntime, Sampling

__all__ = ["ROUTES", "GenerationError", "GenerationRequest", "LlmLimits", "Started", "start_generation"]
ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request body (the fields edgefleet reads; others are ignored, as OpenAI's servers do)."""

    kind: str  # chat | completion
    model: str | None
    messages: tuple[dict[str, str], ...] = ()
    prompt: str = ""
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    stream: bool = False
    body: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, kind: str, body: Any) -> GenerationRequest:
        if not isinstance(body, Mapping):
            raise GenerationError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise GenerationError("'model' must be a string", "model")
        if int(body.get("n", 1) if isinstance(body.get("n", 1), int) else 0) != 1:
            raise GenerationError("only n=1 is supported", "n")
        return cls(
            kind=kind, model=model, messages=_messages(body) if kind == "chat" else (),
            prompt=_prompt(body) if kind == "completion" else "", max_tokens=_max_tokens(body),
            sampling=_sampling(body), stop=_stop(body.get("stop")), stream=_flag(body, "stream"), body=body,
        )  # fmt: skip


def _messages(body: Mapping[str, Any]) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise GenerationError(f"'messages' must be a list of 1 to {MAX_MESSAGES} messages", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise GenerationError(f"messages[{i}] needs a 'role' string", f"messages[{i}]")
        out.append({"role": message["role"], "content": _content(message.get("content"), i)})
    return tuple(out)


def _content(content: Any, index: int) -> str:
    """Text content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise GenerationError(f"messages[{index}].content must be text (this model takes no images)", "messages")


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise GenerationError("'prompt' must be a string (one prompt per request)", "prompt")
    return prompt


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GenerationError("'max_tokens' must be a positive integer", "max_tokens")
    return value


def _number(body: Mapping[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise GenerationError(f"'{key}' must be a number in [{low:g}, {high:g}]", key)
    return float(value)


def _sampling(body: Mapping[str, Any]) -> Sampling:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GenerationError("'seed' must be an integer", "seed")
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    return Sampling(temperature=temperature, top_p=top_p if top_p > 0 else 1.0, seed=seed)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise GenerationError(f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} strings", "stop")
    return tuple(stops)


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise GenerationError(f"'{key}' must be true or false", key)
    return value


@dataclass(frozen=True)
class LlmLimits:
    """A generation bundle's serving limits (``runtime_config.llm``), tightened by the server's own (agent.toml's
    ``[llm]`` on a device)."""

    max_prompt_tokens: int = 0
    max_new_tokens: int = 256
    max_generation_s: float = 30.0

    @classmethod
    def of(cls, manifest: Manifest, local: Mapping[str, Any] | None = None) -> LlmLimits:
        declared = manifest.runtime_config.extra.get("llm") or {}
        own = local or {}

        def tightest(key: str, default: float) -> float:
            values = [v for v in (declared.get(key), own.get(key)) if isinstance(v, (int, float)) and v > 0]
            return min(values) if values else default

        return cls(int(tightest("max_prompt_tokens", 0)), int(tightest("max_new_tokens", 256)),
                   float(tightest("max_generation_s", 30.0)))  # fmt: skip


@dataclass
class Started:
    """A generation that has produced its first piece (None when it ended at once)."""

    stats: GenerationStats
    pieces: Iterator[str]
    first: str | None
    prompt: str

    def rest(self) -> Iterator[str]:
        """Every piece, the first included."""
        if self.first:
            yield self.first
        yield from self.pieces


def start_generation(runtime: Any, request: GenerationRequest, limits: LlmLimits, wait_s: float,
                     started: float | None = None) -> Started:  # fmt: skip
    """Render the prompt, check it, and generate the first piece (BusyError when the model stays busy ``wait_s``)."""
    if not isinstance(runtime, LlamaCppRuntime):
        raise GenerationError("this model is not a language model (use /v2/models/.../infer)", "model")
    began = time.monotonic() if started is None else started
    template_stops: tuple[str, ...] = ()
    if request.kind == "completion":
        prompt = request.prompt
    else:
        prompt, template_stops = runtime.chat_prompt(request.messages)
    check_prompt(runtime, prompt, limits)
    wanted = min(request.max_tokens or limits.max_new_tokens, limits.max_new_tokens)
    stats = GenerationStats()
    pieces = runtime.stream(prompt, wanted, request.sampling, stats, stop=(*request.stop, *template_stops),
                            deadline=began + limits.max_generation_s, wait_s=wait_s)  # fmt: skip
    first = next(pieces, None)
    return Started(stats, pieces, first, prompt)


def check_prompt(runtime: LlamaCppRuntime, prompt: str, limits: LlmLimits) -> None:
    count = len(runtime.tokenize(prompt))
    most = limits.max_prompt_tokens or max(1, runtime.context_tokens - 1)
    if count > most:
        raise GenerationError(f"the prompt is {count} tokens; this model takes at most {most}", "messages")


def ids(request: GenerationRequest) -> tuple[str, int]:
    prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


def finish_reason(stats: GenerationStats) -> str:
    """OpenAI's finish reason: ``stop``, or ``length`` for the token and the wall-time limits."""
    return "stop" if stats.stop_reason == "stop" else "length"


def usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}  # fmt: skip


def figures(stats: GenerationStats) -> dict[str, Any]:
    rate = stats.tokens_per_s
    return {"stop_reason": stats.stop_reason, "ttft_ms": None if stats.ttft_ms is None else round(stats.ttft_ms, 3),
            "tokens_per_s": None if rate is None or not math.isfinite(rate) else round(rate, 2)}  # fmt: skip


def completion_json(request: GenerationRequest, model: str, text: str, stats: GenerationStats,
                     meta: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    ident, created = ids(request)
    reason = finish_reason(stats)
    if request.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        kind = "text_completion"
    return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice],
            "usage": usage(stats), "edgefleet": {**meta, **figures(stats)}}  # fmt: skip


def chunk(request: GenerationRequest, ident: str, created: int, model: str, delta: dict[str, Any],
           finish: str | None, meta: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    if request.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice], "edgefleet": meta}


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode("utf-8") + b"\n\n"


def prompt_text(request: GenerationRequest) -> str:
    if request.kind == "completion":
        return request.prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in request.messages)


def answer_text(answer: Mapping[str, Any]) -> str:
    choices = answer.get("choices") or [{}]
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], Mapping) else {}
    message = first.get("message")
    return str(message.get("content", "") if isinstance(message, Mapping) else first.get("text", ""))

"""OpenAI-compatible generation on the device: ``/v1/chat/completions`` and ``/v1/completions``.

Flow of one request (:meth:`LlmApi.answer`):

1. the body is checked (:class:`GenerationRequest`: ``model``, ``messages`` or ``prompt``,
   ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``); a bad one is a 400;
2. the local model answers when it can: the engine admits the request (``max_concurrency`` running,
   ``max_waiting`` queued, else busy), the prompt is rendered with the model's chat template and
   checked against the bundle's limits (``runtime_config.llm``: ``max_prompt_tokens``,
   ``max_new_tokens`` caps ``max_tokens``, ``max_generation_s`` ends a generation with stop reason
   ``time_limit``), and the one llama.cpp context is waited for at most the queue timeout, or the
   bundle's ``deadline_ms`` when it has one;
3. otherwise the cloud endpoint answers the same request on the same route (the desired state's
   fallback URL, ``/v2`` replaced by ``/v1``): when no local model is ready (``not_ready``), the
   device is saturated (``busy``), the deadline passed before generation began (``deadline``) or the
   local runtime failed (``local_error``). Without a cloud, or when it fails too, the answer is a 503
   naming every reason.

Every answer says where it came from: an ``edgefleet`` object (``source`` local or cloud, the
bundle version and variant, ``fallback_reason``, the stop reason, TTFT and tokens/s) in the JSON and
in every streamed chunk, and the ``X-Edgefleet-Source`` header. Streaming is server-sent events as
OpenAI sends them (``data: {chunk}`` lines, then ``data: [DONE]``); the first token is generated
before the answer starts, so refusals and fallbacks still get their status codes.

Telemetry: each answer is counted like any prediction (``TelemetryRecorder.record``: source,
latency, fallback reason, error) with the prompt and completion text as its sampled input and
output, after the redaction hook (``[llm] redaction = "module:function"`` in agent.toml, a
``(text, kind) -> text`` function with kind ``prompt`` or ``completion``); local generations add
their token counts, stop reason, TTFT and tokens/s to the window (``record_generation``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from bundles.errors import BusyError, ConfigError, EdgeFleetError, InferenceError, InputError, ModelNotReadyError
from bundles.manifest import Manifest
from bundles.runtimes.llama_cpp import GenerationStats, LlamaCppRuntime, Sampling

log = logging.getLogger(__name__)
ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
Redactor = Callable[[str, str], str]


@dataclass(frozen=True)
class LlmSettings:
    """``[llm]`` in agent.toml. Limits of 0 leave the bundle's own (``runtime_config.llm``); others tighten them.

    ``redaction``: ``module:function`` applied to prompts and completions before they are sampled into
    the prediction log. ``cloud_url``: the cloud's base URL for the OpenAI routes (default: the
    desired state's fallback URL without its ``/v2``).
    """

    max_prompt_tokens: int = 0
    max_new_tokens: int = 0
    max_generation_s: float = 0.0
    redaction: str = ""
    cloud_url: str = ""
    cloud_timeout_s: float = 30.0


class GenerationError(InputError):
    """A request the OpenAI routes refuse (400), with the OpenAI error ``param`` it concerns."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
    """A generation bundle's serving limits (``runtime_config.llm``), tightened by agent.toml's ``[llm]``."""

    max_prompt_tokens: int = 0
    max_new_tokens: int = 256
    max_generation_s: float = 30.0

    @classmethod
    def of(cls, manifest: Manifest, agent: Mapping[str, Any]) -> LlmLimits:
        declared = manifest.runtime_config.extra.get("llm") or {}

        def tightest(key: str, default: float) -> float:
            values = [v for v in (declared.get(key), agent.get(key)) if isinstance(v, (int, float)) and v > 0]
            return min(values) if values else default

        return cls(int(tightest("max_prompt_tokens", 0)), int(tightest("max_new_tokens", 256)),
                   float(tightest("max_generation_s", 30.0)))  # fmt: skip


@dataclass
class Answer:
    """What the HTTP layer sends: a JSON object, or server-sent events (``events`` yields encoded lines)."""

    headers: dict[str, str]
    json: dict[str, Any] | None = None
    events: Iterator[bytes] | None = None


@dataclass
class _Local:
    """A local generation that has produced its first piece (or nothing yet, when it ended at once)."""

    loaded: Any
    manifest: Manifest
    variant: str
    stats: GenerationStats
    pieces: Iterator[str]
    first: str | None
    prompt: str
    started: float


class LlmApi:
    """The OpenAI-compatible routes over an :class:`~device_agent.agent.Agent` (see the module docstring)."""

    def __init__(self, agent: Any, settings: Mapping[str, Any] | None = None,
                 client: httpx.Client | None = None) -> None:  # fmt: skip
        self.agent = agent
        self.settings = dict(settings or {})
        self.redact = load_redactor(self.settings.get("redaction"))
        self.client = client or httpx.Client(timeout=float(self.settings.get("cloud_timeout_s", 30.0)))

    # --- entry point ------------------------------------------------------------------------------

    def answer(self, route: str, body: Any) -> Answer:
        """Answer ``POST route`` with ``body`` (already parsed JSON)."""
        request = GenerationRequest.parse(ROUTES[route], body)
        model = self._model_name(request.model)
        started = time.monotonic()
        reasons: list[str] = []
        try:
            local = self._start_local(model, request, started)
        except _NoLocal as e:
            reasons.append(f"local: {e}")
            return self._from_cloud(route, model, request, e.reason, reasons, started)
        return self._local_answer(model, request, local)

    def _model_name(self, requested: str | None) -> str:
        known = list(getattr(self.agent, "known_models", lambda: [])())
        if requested is not None:
            if known and requested not in known:
                raise _not_found(requested)
            return requested
        if len(known) == 1:
            return str(known[0])
        raise GenerationError("'model' is required (this device serves " + (", ".join(known) or "nothing yet") + ")",
                              "model")  # fmt: skip

    # --- local ------------------------------------------------------------------------------------

    def _start_local(self, model: str, request: GenerationRequest, started: float) -> _Local:
        engine = self.agent.engine
        manifest = engine.active_manifest(model)
        if manifest is None:
            raise _NoLocal("not_ready", f"model '{model}' is not loaded on this device")
        deadline_s = _deadline_s(manifest)
        queue_s = engine.queue_timeout_s if deadline_s is None else min(engine.queue_timeout_s, deadline_s)
        try:
            loaded = engine.acquire(model, queue_s)
        except ModelNotReadyError as e:
            raise _NoLocal("not_ready", str(e)) from e
        except BusyError as e:
            raise _NoLocal("deadline" if deadline_s is not None else "busy", str(e)) from e
        try:
            return self._generate(loaded, request, started, deadline_s, queue_s)
        except BaseException:
            engine.release(loaded)
            raise

    def _generate(self, loaded: Any, request: GenerationRequest, started: float, deadline_s: float | None,
                  queue_s: float) -> _Local:  # fmt: skip
        runtime = loaded.predictor.runtime
        manifest = loaded.manifest
        if not isinstance(runtime, LlamaCppRuntime):
            raise GenerationError(f"model '{manifest.name}' is not a language model (use /v2/models/.../infer)")
        limits = LlmLimits.of(manifest, self.settings)
        prompt, template_stops = (request.prompt, ()) if request.kind == "completion" else runtime.chat_prompt(
            request.messages
        )  # fmt: skip
        _check_prompt(runtime, prompt, limits)
        wanted = request.max_tokens or limits.max_new_tokens
        stats = GenerationStats()
        wait_s = queue_s if deadline_s is None else max(0.0, min(queue_s, deadline_s - (time.monotonic() - started)))
        pieces = runtime.stream(
            prompt, min(wanted, limits.max_new_tokens), request.sampling, stats, stop=(*request.stop, *template_stops),
            deadline=started + limits.max_generation_s, wait_s=wait_s,
        )  # fmt: skip
        try:
            first = next(pieces, None)
        except BusyError as e:
            raise _NoLocal("deadline" if deadline_s is not None else "busy", str(e)) from e
        except InferenceError as e:
            raise _NoLocal("local_error", str(e)) from e
        return _Local(loaded, manifest, loaded.variant, stats, pieces, first, prompt, started)

    def _local_answer(self, model: str, request: GenerationRequest, local: _Local) -> Answer:
        meta = {"source": "local", "version": local.manifest.version, "variant": local.variant,
                "fallback_reason": None}  # fmt: skip
        headers = {"X-Edgefleet-Source": "local"}
        if request.stream:
            return Answer(headers, events=self._local_events(model, request, local, meta))
        text = self._drain(model, local)
        return Answer(headers, json=_completion_json(request, model, text, local.stats, meta))

    def _drain(self, model: str, local: _Local) -> str:
        parts: list[str] = []
        error: str | None = None
        try:
            parts = [local.first or "", *local.pieces]
        except EdgeFleetError as e:
            error = str(e)
            raise
        finally:
            self._finish_local(model, local, "".join(parts), error)
        return "".join(parts)

    def _local_events(self, model: str, request: GenerationRequest, local: _Local,
                      meta: dict[str, Any]) -> Iterator[bytes]:  # fmt: skip
        ident, created = _ids(request)
        parts: list[str] = []
        error: str | None = None
        try:
            yield _event(_chunk(request, ident, created, model, {"role": "assistant", "content": ""}, None, meta))
            for piece in _chain(local.first, local.pieces):
                parts.append(piece)
                yield _event(_chunk(request, ident, created, model, {"content": piece}, None, meta))
            final = {**meta, **_figures(local.stats)}
            last = _chunk(request, ident, created, model, {}, _finish_reason(local.stats), final)
            last["usage"] = _usage(local.stats)
            yield _event(last)
            yield b"data: [DONE]\n\n"
        except EdgeFleetError as e:
            error = str(e)
            yield _event({"error": {"message": error, "type": "server_error"}})
        finally:
            self._finish_local(model, local, "".join(parts), error)

    def _finish_local(self, model: str, local: _Local, text: str, error: str | None) -> None:
        """Release the model, then count the answer in telemetry (never fails the request)."""
        self.agent.engine.release(local.loaded)
        latency_ms = (time.monotonic() - local.started) * 1000.0
        stats = local.stats
        self._record(model, local.manifest, local.prompt, text, "local" if error is None else None, latency_ms, None,
                     error)  # fmt: skip
        recorder = getattr(self.agent, "recorder", None)
        if recorder is not None and error is None:
            try:
                recorder.record_generation(model, local.manifest, stats.prompt_tokens, stats.completion_tokens,
                                           stats.stop_reason, stats.ttft_ms, stats.tokens_per_s)  # fmt: skip
            except Exception as e:  # telemetry must never fail an answer
                log.warning("llm telemetry failed: %s", e)

    def _record(self, model: str, manifest: Manifest | None, prompt: str, completion: str, source: str | None,
                latency_ms: float, fallback_reason: str | None, error: str | None) -> None:  # fmt: skip
        recorder = getattr(self.agent, "recorder", None)
        if recorder is None:
            return
        try:
            inputs = {"prompt": np.array([self.redact(prompt, "prompt")], dtype=object)}
            outputs = None if source is None else {"completion": np.array([self.redact(completion, "completion")],
                                                                           dtype=object)}  # fmt: skip
            recorder.record(model, manifest, inputs, outputs, source, latency_ms, fallback_reason, error,
                            inputs_private=True)  # fmt: skip
        except Exception as e:  # telemetry must never fail an answer
            log.warning("llm telemetry failed: %s", e)

    # --- cloud ------------------------------------------------------------------------------------

    def _from_cloud(self, route: str, model: str, request: GenerationRequest, reason: str, reasons: list[str],
                    started: float) -> Answer:  # fmt: skip
        manifest = self.agent.engine.active_manifest(model)
        url, cloud_model = self._cloud_target(model)
        if url is None:
            reasons.append("cloud: no cloud endpoint is configured")
            self._record(model, manifest, _prompt_text(request), "", None, _ms(started), reason, "; ".join(reasons))
            raise ModelNotReadyError(f"no answer for '{model}': {'; '.join(reasons)}")
        body = {**request.body, "model": cloud_model}
        meta = {"source": "cloud", "version": None, "variant": None, "fallback_reason": reason}
        headers = {"X-Edgefleet-Source": "cloud", "X-Edgefleet-Fallback-Reason": reason}
        try:
            if request.stream:
                return Answer(headers, events=self._cloud_events(url + route, body, meta, model, manifest, request,
                                                                 started))  # fmt: skip
            answer = self._post(url + route, body)
        except EdgeFleetError as e:
            reasons.append(f"cloud: {e}")
            self._record(model, manifest, _prompt_text(request), "", None, _ms(started), reason, "; ".join(reasons))
            raise ModelNotReadyError(f"no answer for '{model}': {'; '.join(reasons)}") from e
        answer["edgefleet"] = {**(answer.get("edgefleet") or {}), **meta}
        self._record(model, manifest, _prompt_text(request), _answer_text(answer), "cloud", _ms(started), reason, None)
        return Answer(headers, json=answer)

    def _cloud_target(self, model: str) -> tuple[str | None, str]:
        config = self.agent.pipeline.config
        base = self.settings.get("cloud_url") or config.cloud_url
        if not base:
            return None, model
        base = str(base).rstrip("/")
        base = base[: -len("/v2")] if base.endswith("/v2") else base
        return base, config.cloud_model.get(model, model)

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self.client.post(url, json=body)
        except httpx.HTTPError as e:
            raise InferenceError(f"{url} failed: {type(e).__name__}: {e}") from e
        if response.status_code != 200:
            raise InferenceError(f"{url} answered {response.status_code}: {response.text[:200]}")
        try:
            parsed = response.json()
        except ValueError as e:
            raise InferenceError(f"{url} answered something that is not JSON") from e
        if not isinstance(parsed, dict):
            raise InferenceError(f"{url} answered something that is not a JSON object")
        return parsed

    def _cloud_events(self, url: str, body: dict[str, Any], meta: dict[str, Any], model: str,
                      manifest: Manifest | None, request: GenerationRequest,
                      started: float) -> Iterator[bytes]:  # fmt: skip
        """The cloud's events, each chunk tagged with where it came from."""
        parts: list[str] = []
        error: str | None = None
        try:
            with self.client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    raise InferenceError(f"{url} answered {response.status_code}")
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        yield b"data: [DONE]\n\n"
                        break
                    chunk = json.loads(line[6:])
                    chunk["edgefleet"] = {**(chunk.get("edgefleet") or {}), **meta}
                    parts += [str(c.get("delta", {}).get("content") or c.get("text") or "")
                              for c in chunk.get("choices", [])]  # fmt: skip
                    yield _event(chunk)
        except (httpx.HTTPError, EdgeFleetError, ValueError) as e:
            error = f"cloud: {e}"
            yield _event({"error": {"message": error, "type": "server_error"}})
        finally:
            self._record(model, manifest, _prompt_text(request), "".join(parts), None if error else "cloud",
                         _ms(started), meta["fallback_reason"], error)  # fmt: skip

    def close(self) -> None:
        self.client.close()


class _NoLocal(Exception):
    """The local model cannot answer; ``reason`` is the fallback reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _not_found(model: str) -> Exception:
    from device_agent.httpapi import HttpError

    return HttpError(404, f"model '{model}' is not installed on this device")


def _deadline_s(manifest: Manifest) -> float | None:
    deadline_ms = manifest.runtime_config.deadline_ms
    return None if deadline_ms is None else deadline_ms / 1000.0


def _check_prompt(runtime: LlamaCppRuntime, prompt: str, limits: LlmLimits) -> None:
    count = len(runtime.tokenize(prompt))
    most = limits.max_prompt_tokens or max(1, runtime.context_tokens - 1)
    if count > most:
        raise GenerationError(f"the prompt is {count} tokens; this model takes at most {most}", "messages")


def _chain(first: str | None, rest: Iterator[str]) -> Iterator[str]:
    if first:
        yield first
    yield from rest


def _ids(request: GenerationRequest) -> tuple[str, int]:
    prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


def _finish_reason(stats: GenerationStats) -> str:
    """OpenAI's finish reason: ``stop``, or ``length`` for the token and the wall-time limits."""
    return "stop" if stats.stop_reason == "stop" else "length"


def _usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}  # fmt: skip


def _figures(stats: GenerationStats) -> dict[str, Any]:
    rate = stats.tokens_per_s
    return {"stop_reason": stats.stop_reason, "ttft_ms": None if stats.ttft_ms is None else round(stats.ttft_ms, 3),
            "tokens_per_s": None if rate is None or not math.isfinite(rate) else round(rate, 2)}  # fmt: skip


def _completion_json(request: GenerationRequest, model: str, text: str, stats: GenerationStats,
                     meta: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    ident, created = _ids(request)
    reason = _finish_reason(stats)
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
            "usage": _usage(stats), "edgefleet": {**meta, **_figures(stats)}}  # fmt: skip


def _chunk(request: GenerationRequest, ident: str, created: int, model: str, delta: dict[str, Any],
           finish: str | None, meta: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    if request.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice], "edgefleet": meta}


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _prompt_text(request: GenerationRequest) -> str:
    if request.kind == "completion":
        return request.prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in request.messages)


def _answer_text(answer: Mapping[str, Any]) -> str:
    choices = answer.get("choices") or [{}]
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], Mapping) else {}
    message = first.get("message")
    return str(message.get("content", "") if isinstance(message, Mapping) else first.get("text", ""))


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0


def load_redactor(ref: Any) -> Redactor:
    """The redaction hook named ``module:function`` (identity when None); a bad reference is a ConfigError."""
    if ref is None or ref == "":
        return _keep
    if not isinstance(ref, str) or ":" not in ref:
        raise ConfigError(f"[llm] redaction = {ref!r} is not 'module:function'")
    module_name, _, name = ref.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"[llm] redaction = {ref!r} cannot be imported: {e}") from e
    if not callable(function):
        raise ConfigError(f"[llm] redaction = {ref!r} is not callable")
    return function  # type: ignore[no-any-return]


def _keep(text: str, _kind: str) -> str:
    return text

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
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from bundles.errors import (
    BusyError,
    ConfigError,
    EdgeFleetError,
    InferenceError,
    InputError,
    ModelNotReadyError,
    RequestTooLargeError,
)
from bundles.manifest import Manifest
from bundles.openai_compat import (
    ROUTES,
    GenerationError,
    GenerationRequest,
    LlmLimits,
    Started,
    answer_text,
    chunk,
    completion_json,
    event,
    figures,
    finish_reason,
    ids,
    prompt_text,
    start_generation,
    usage,
)

log = logging.getLogger(__name__)
Redactor = Callable[[str, str], str]
__all__ = ["ROUTES", "Answer", "GenerationError", "LlmApi", "LlmSettings", "load_redactor"]


@dataclass(frozen=True)
class LlmSettings:
    """``[llm]`` in agent.toml. Limits of 0 leave the bundle's own (``runtime_config.llm``); others tighten them.

    ``redaction``: ``module:function`` applied to prompts and completions before they are sampled into
    the prediction log. ``cloud_url``: the cloud's base URL for the OpenAI routes (default: the
    serving fallback URL without its ``/v2``, with the device's token when it is the fleet's).
    """

    max_prompt_tokens: int = 0
    max_new_tokens: int = 0
    max_generation_s: float = 0.0
    redaction: str = ""
    cloud_url: str = ""
    cloud_timeout_s: float = 30.0


@dataclass
class Answer:
    """What the HTTP layer sends: a JSON object, or server-sent events (``events`` yields encoded lines)."""

    headers: dict[str, str]
    json: dict[str, Any] | None = None
    events: Iterator[bytes] | None = None


@dataclass
class _Local:
    """A local generation under way, with the engine admission it holds."""

    loaded: Any
    generation: Started
    started: float

    @property
    def manifest(self) -> Manifest:
        manifest: Manifest = self.loaded.manifest
        return manifest


class _NoLocal(Exception):
    """The local model cannot answer; ``reason`` is the fallback reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LlmApi:
    """The OpenAI-compatible routes over an :class:`~device_agent.agent.Agent` (see the module docstring)."""

    def __init__(self, agent: Any, settings: Mapping[str, Any] | None = None,
                 client: httpx.Client | None = None) -> None:  # fmt: skip
        self.agent = agent
        self.settings = dict(settings or {})
        self.redact = load_redactor(self.settings.get("redaction"))
        self.client = client or httpx.Client(timeout=float(self.settings.get("cloud_timeout_s", 30.0)))

    def answer(self, route: str, body: Any) -> Answer:
        """Answer ``POST route`` with ``body`` (already parsed JSON)."""
        request = GenerationRequest.parse(ROUTES[route], body)
        model = self._model_name(request.model)
        await_start_up = getattr(self.agent, "await_start_up", None)
        if callable(await_start_up):  # a model still being verified at start-up answers locally once loaded
            await_start_up()
        started = time.monotonic()
        try:
            local = self._start_local(model, request, started)
        except _NoLocal as e:
            return self._from_cloud(route, model, request, e.reason, [f"local: {e}"], started)
        return self._local_answer(model, request, local)

    def _model_name(self, requested: str | None) -> str:
        known = list(getattr(self.agent, "known_models", list)())
        if requested is not None:
            if known and requested not in known:
                from device_agent.httpapi import HttpError

                raise HttpError(404, f"model '{requested}' is not installed on this device")
            return requested
        if len(known) == 1:
            return str(known[0])
        served = ", ".join(known) or "nothing yet"
        raise GenerationError(f"'model' is required (this device serves {served})", "model")

    # --- local ------------------------------------------------------------------------------------

    def _start_local(self, model: str, request: GenerationRequest, started: float) -> _Local:
        engine = self.agent.engine
        manifest = engine.active_manifest(model)
        if manifest is None:
            raise _NoLocal("not_ready", f"model '{model}' is not loaded on this device")
        deadline_s = None if manifest.runtime_config.deadline_ms is None else manifest.runtime_config.deadline_ms / 1e3
        queue_s = engine.queue_timeout_s if deadline_s is None else min(engine.queue_timeout_s, deadline_s)
        late = "deadline" if deadline_s is not None else "busy"
        try:
            loaded = engine.acquire(model, queue_s)
        except ModelNotReadyError as e:
            raise _NoLocal("not_ready", str(e)) from e
        except BusyError as e:
            raise _NoLocal(late, str(e)) from e
        try:
            limits = LlmLimits.of(loaded.manifest, self.settings)
            wait_s = queue_s if deadline_s is None else max(0.0, deadline_s - (time.monotonic() - started))
            generation = start_generation(loaded.predictor.runtime, request, limits, min(queue_s, wait_s), started)
        except BusyError as e:
            engine.release(loaded)
            raise _NoLocal(late, str(e)) from e
        except InputError:
            engine.release(loaded)
            raise
        except InferenceError as e:
            engine.release(loaded)
            raise _NoLocal("local_error", str(e)) from e
        except BaseException:
            engine.release(loaded)
            raise
        return _Local(loaded, generation, started)

    def _local_answer(self, model: str, request: GenerationRequest, local: _Local) -> Answer:
        meta = {"source": "local", "version": local.manifest.version, "variant": local.loaded.variant,
                "fallback_reason": None}  # fmt: skip
        headers = {"X-Edgefleet-Source": "local"}
        if request.stream:
            return Answer(headers, events=self._local_events(model, request, local, meta))
        parts: list[str] = []
        error: str | None = None
        try:
            parts = list(local.generation.rest())
        except EdgeFleetError as e:
            error = str(e)
            raise
        finally:
            self._finish_local(model, local, "".join(parts), error)
        stats = local.generation.stats
        return Answer(headers, json=completion_json(request, model, "".join(parts), stats, meta))

    def _local_events(self, model: str, request: GenerationRequest, local: _Local,
                      meta: dict[str, Any]) -> Iterator[bytes]:  # fmt: skip
        ident, created = ids(request)
        parts: list[str] = []
        error: str | None = None
        stats = local.generation.stats
        try:
            yield event(chunk(request, ident, created, model, {"role": "assistant", "content": ""}, None, meta))
            for piece in local.generation.rest():
                parts.append(piece)
                yield event(chunk(request, ident, created, model, {"content": piece}, None, meta))
            last = chunk(request, ident, created, model, {}, finish_reason(stats), {**meta, **figures(stats)})
            last["usage"] = usage(stats)
            yield event(last)
            yield b"data: [DONE]\n\n"
        except EdgeFleetError as e:
            error = str(e)
            yield event({"error": {"message": error, "type": "server_error"}})
        finally:
            self._finish_local(model, local, "".join(parts), error)

    def _finish_local(self, model: str, local: _Local, text: str, error: str | None) -> None:
        """Release the model, then count the answer in telemetry (never fails the request)."""
        self.agent.engine.release(local.loaded)
        stats = local.generation.stats
        self._record(model, local.manifest, local.generation.prompt, text, "local" if error is None else None,
                     _ms(local.started), None, error)  # fmt: skip
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
            completion = self.redact(completion, "completion")
            outputs = None if source is None else {"completion": np.array([completion], dtype=object)}
            recorder.record(model, manifest, inputs, outputs, source, latency_ms, fallback_reason, error,
                            inputs_private=True)  # fmt: skip
        except Exception as e:  # telemetry must never fail an answer
            log.warning("llm telemetry failed: %s", e)

    # --- cloud ------------------------------------------------------------------------------------

    def _from_cloud(self, route: str, model: str, request: GenerationRequest, reason: str, reasons: list[str],
                    started: float) -> Answer:  # fmt: skip
        manifest = self.agent.engine.active_manifest(model)
        url, cloud_model, auth = self._cloud_target(model)
        if url is None:
            reasons.append("cloud: no cloud endpoint is configured")
            self._record(model, manifest, prompt_text(request), "", None, _ms(started), reason, "; ".join(reasons))
            raise ModelNotReadyError(f"no answer for '{model}': {'; '.join(reasons)}")
        body = {**request.body, "model": cloud_model}
        meta = {"source": "cloud", "fallback_reason": reason}
        headers = {"X-Edgefleet-Source": "cloud", "X-Edgefleet-Fallback-Reason": reason}
        if request.stream:
            events = self._cloud_events(url + route, body, auth, meta, (model, manifest, request, started))
            return Answer(headers, events=events)
        try:
            answer = self._post(url + route, body, auth)
        except InputError as e:  # the cloud refused the request itself: the client's error (400/413), as if local
            reasons.append(f"cloud: {e}")
            self._record(model, manifest, prompt_text(request), "", None, _ms(started), reason, "; ".join(reasons))
            raise
        except EdgeFleetError as e:
            reasons.append(f"cloud: {e}")
            self._record(model, manifest, prompt_text(request), "", None, _ms(started), reason, "; ".join(reasons))
            raise ModelNotReadyError(f"no answer for '{model}': {'; '.join(reasons)}") from e
        answer["edgefleet"] = {**(answer.get("edgefleet") or {}), **meta}
        self._record(model, manifest, prompt_text(request), answer_text(answer), "cloud", _ms(started), reason, None)
        return Answer(headers, json=answer)

    def _cloud_target(self, model: str) -> tuple[str | None, str, dict[str, str]]:
        """The cloud's base URL, its name for ``model`` and the headers (the device's token for the fleet's)."""
        config = self.agent.pipeline.config
        own = self.settings.get("cloud_url")
        base = own or config.cloud_url
        if not base:
            return None, model, {}
        base = str(base).rstrip("/")
        base = base[: -len("/v2")] if base.endswith("/v2") else base
        token = None if own else getattr(config, "cloud_token", None)
        return base, config.cloud_model.get(model, model), {"Authorization": f"Bearer {token}"} if token else {}

    def _post(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        try:
            response = self.client.post(url, json=body, headers=headers)
        except httpx.HTTPError as e:
            raise InferenceError(f"{url} failed: {type(e).__name__}: {e}") from e
        if response.status_code in (400, 413):
            raise _cloud_refusal(response)
        if response.status_code != 200:
            raise InferenceError(f"{url} answered {response.status_code}: {response.text[:200]}")
        try:
            parsed = response.json()
        except ValueError as e:
            raise InferenceError(f"{url} answered something that is not JSON") from e
        if not isinstance(parsed, dict):
            raise InferenceError(f"{url} answered something that is not a JSON object")
        return parsed

    def _cloud_events(self, url: str, body: dict[str, Any], headers: dict[str, str], meta: dict[str, Any],
                      context: tuple[str, Manifest | None, GenerationRequest, float]) -> Iterator[bytes]:  # fmt: skip
        """The cloud's events, each chunk tagged with where it came from."""
        model, manifest, request, started = context
        parts: list[str] = []
        error: str | None = None
        try:
            with self.client.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    raise InferenceError(f"{url} answered {response.status_code}")
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        yield b"data: [DONE]\n\n"
                        break
                    if line.startswith("data: "):
                        data = json.loads(line[6:])
                        data["edgefleet"] = {**(data.get("edgefleet") or {}), **meta}
                        parts.append(_delta_text(data))
                        yield event(data)
        except (httpx.HTTPError, EdgeFleetError, ValueError) as e:
            error = f"cloud: {e}"
            yield event({"error": {"message": error, "type": "server_error"}})
        finally:
            self._record(model, manifest, prompt_text(request), "".join(parts), None if error else "cloud",
                         _ms(started), meta["fallback_reason"], error)  # fmt: skip

    def close(self) -> None:
        self.client.close()


def _cloud_refusal(response: httpx.Response) -> InputError:
    """The cloud's 400 (or 413) as the error the device's own checks raise, with the cloud's message and param."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    error = error if isinstance(error, dict) else {"message": str(error or response.text[:200])}
    message = f"the cloud refused the request: {str(error.get('message'))[:500]}"
    if response.status_code == 413:
        return RequestTooLargeError(message)
    param = error.get("param")
    return GenerationError(message, param if isinstance(param, str) else None)


def _delta_text(data: Mapping[str, Any]) -> str:
    choices = data.get("choices") or []
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], Mapping) else {}
    delta = first.get("delta")
    return str((delta.get("content") if isinstance(delta, Mapping) else first.get("text")) or "")


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

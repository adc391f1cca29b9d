"""The localhost HTTP API: the Open Inference Protocol (KServe v2 REST), so apps can point at the
device or the cloud endpoint with the same client.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata),
``GET /v2/models/{m}`` (model metadata), ``GET /v2/models/{m}/ready``, ``POST /v2/models/{m}/infer``
(also under ``/versions/{v}/``), the OpenAI-compatible ``POST /v1/chat/completions``,
``POST /v1/completions`` and ``GET /v1/models`` for language models (:mod:`device_agent.llm`,
server-sent events when ``stream`` is true), plus ``GET /edgefleet/status`` (what ``edgefleet-agent status``
shows). Tensors are JSON (``{"name", "shape", "datatype", "data"}``, data row-major and flat or
nested); the binary tensor extension is supported: with ``Inference-Header-Content-Length`` the JSON
header is followed by raw little-endian tensor bytes (``"parameters": {"binary_data_size": n}``),
and outputs asked with ``"parameters": {"binary_data": true}`` come back the same way. Errors are
``{"error": "<one sentence>"}`` with 400 (bad request), 404 (no such model, version or path: never
forwarded to the cloud), 413 (too large for the device or the model), 415 (unknown
``Content-Encoding``) or 503 (not ready, busy: with ``Retry-After``).

The tensor codec is :mod:`bundles.oip`, the cloud endpoint's own, so both read and write every
datatype (FP16, BYTES in JSON or binary) alike.

A request goes: waitress (limits on headers, body size and time, strict parsing) -> :class:`OipApp`
(route; 404 for an unknown model or version; the body limit of the model's input schema; gzip or
deflate inflated under that limit; declared shapes pre-scanned; the parse cost reserved in the
memory budget, see :mod:`device_agent.admission`) -> :class:`InferenceApi` (tensors decoded,
non-finite values refused unless the input allows them) -> the serving pipeline, which checks the
tensors against the model's inputs: a bundle that cannot take what apps send is then counted as
failing (telemetry, rollout gates) and the fallback chain may still answer. Served by waitress, a
small pure-Python WSGI server (no web framework on the device).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from bundles import oip
from bundles.errors import (
    BusyError,
    ConfigError,
    EdgeFleetError,
    InferenceError,
    InputError,
    ModelNotReadyError,
    RequestTooLargeError,
    UnsupportedEncodingError,
)
from bundles.manifest import Manifest, TensorSpec
from device_agent.admission import (
    MemoryBudget,
    model_max_body_bytes,
    model_max_elements,
    parse_cost_bytes,
)
from device_agent.fastpath import (
    PREPARED_ANSWER,
    FastPath,
    FastPathDispatcher,
    FastPathSettings,
    prepared_task_factory,
)
from device_agent.version import AGENT_VERSION

log = logging.getLogger(__name__)
logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" at every burst: not news
MAX_BODY_BYTES = 64 * 2**20


Answer = tuple[dict[str, Any] | bytes, bytes]
"""An inference answer: its JSON header (an object, or already written as bytes) and its binary outputs."""


class HttpError(Exception):
    """An answer other than 200, with its status and one readable sentence."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


class InferenceApi:
    """The protocol logic, independent of the HTTP server (so it is easy to test and reuse).

    ``agent`` is a :class:`device_agent.agent.Agent`; anything with ``predict(inputs, model)`` works
    for inference alone (a test's stand-in, another process's pipeline), without the model checks.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._llm: Any = None

    @property
    def llm(self) -> Any:
        """The OpenAI-compatible routes (:class:`device_agent.llm.LlmApi`), built on first use."""
        if self._llm is None:
            from device_agent.llm import LlmApi

            config = getattr(self.agent, "config", None)
            self._llm = LlmApi(self.agent, getattr(config, "llm", None))
        return self._llm

    def openai_models(self) -> dict[str, Any]:
        """``GET /v1/models``: the models this device answers for."""
        known: list[str] = list(getattr(self.agent, "known_models", list)())
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "edgefleet"} for m in known]}

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "edgefleet-agent", "version": AGENT_VERSION, "extensions": ["binary_tensor_data"]}

    def status(self) -> dict[str, Any]:
        return dict(self.agent.status())

    def live(self) -> dict[str, Any]:
        return {"live": True}

    def ready(self) -> dict[str, Any]:
        """Ready only when every model this device should answer is served locally (else 503 saying which not)."""
        models = self.agent.readiness()
        missing = {name: m["problem"] for name, m in models.items() if not m["ready"]}
        if not models or missing:
            detail = "; ".join(f"{name}: {problem}" for name, problem in missing.items())
            raise HttpError(503, f"not ready: {detail}" if detail else "no model is loaded on this device yet")
        return {"ready": True, "models": sorted(models)}

    def model_ready(self, model: str) -> dict[str, Any]:
        self.check_target(model, None)
        if not self.agent.engine.ready(model):
            raise HttpError(503, f"model '{model}' is not loaded on this device", retry_after_s=5)
        return {"name": model, "ready": True}

    def model_metadata(self, model: str) -> dict[str, Any]:
        manifest = self.agent.engine.active_manifest(model)
        if manifest is None:
            raise HttpError(404, f"model '{model}' is not installed on this device")

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": oip.MANIFEST_TO_OIP[t.dtype], "shape": list(t.shape)} for t in specs]

        return {"name": model, "versions": [str(manifest.version)], "platform": "edgefleet",
                "inputs": tensors(manifest.inputs), "outputs": tensors(manifest.outputs)}  # fmt: skip

    def await_start_up(self) -> None:
        """Let the agent's start-up finish verifying the installed slots first (see ``Agent.await_start_up``)."""
        wait = getattr(self.agent, "await_start_up", None)
        if callable(wait):
            wait()

    def manifest(self, model: str) -> Manifest | None:
        """The served manifest of ``model`` (None when nothing local serves it, or for a stand-in agent)."""
        engine = getattr(self.agent, "engine", None)
        return None if engine is None else engine.active_manifest(model)

    def waits_on_deadline_thread(self, model: str) -> bool:
        """Whether ``model``'s calls now run on the serving pipeline's deadline thread, the caller waiting
        for them (a deadline whose recent latencies do not yet allow inline calls; see ``DeadlineGuard``)."""
        pipeline = getattr(self.agent, "pipeline", None)
        guard = None if pipeline is None else pipeline.deadline_guard(model)
        return guard is not None and not guard.inline

    def check_target(self, model: str, version: str | None) -> None:
        """404 for a model this device does not run, or a version it does not serve (never sent to the cloud)."""
        known = getattr(self.agent, "known_models", None)
        if known is None:
            return
        if model not in known():
            raise HttpError(404, f"model '{model}' is not installed on this device")
        if version is None:
            return
        manifest = self.manifest(model)
        served = manifest.version if manifest is not None else self.agent.expected_version(model)
        if served is None or version != str(served):
            serving = "no version" if served is None else f"version {served}"
            raise HttpError(404, f"model '{model}' version {version} is not on this device (it serves {serving})")

    def infer(
        self, model: str, header: dict[str, Any], binary: bytes, manifest: Manifest | None = None,
        version: str | None = None,
    ) -> tuple[dict[str, Any], bytes]:  # fmt: skip
        """Run one OIP inference request; returns the JSON answer and any binary output bytes.

        ``version`` (``/versions/{v}/``, checked by :meth:`check_target`) is also what the fallback asks for.
        """
        return self.infer_decoded(model, header, self.decode(header, binary, manifest), version)

    def infer_decoded(
        self, model: str, header: dict[str, Any], inputs: dict[str, np.ndarray], version: str | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """:meth:`infer` on inputs already decoded (:meth:`decode`)."""
        if version is None:
            result = self.agent.predict(inputs, model=model)
        else:
            result = self.agent.predict(inputs, model=model, version=int(version))
        return self.answer(model, header, result)

    def infer_together(
        self, model: str, requests: list[tuple[dict[str, Any], dict[str, np.ndarray]]], version: str | None = None
    ) -> list[Answer | Exception]:
        """Several decoded requests on one model: one model call when the pipeline can batch them
        (``Agent.predict_together``), else each alone. Each gets its answer, or the error that is its answer."""
        together = getattr(self.agent, "predict_together", None)
        inputs = [inputs for _, inputs in requests]  # freshly decoded: private to this call
        results = together(inputs, model=model, inputs_private=True) if callable(together) else None
        encoded = _encoded_together(model, requests, results)
        answers: list[Answer | Exception] = []
        for index, (header, decoded) in enumerate(requests):
            try:
                if results is None:
                    answers.append(self.infer_decoded(model, header, decoded, version))
                elif index in encoded:
                    answers.append((encoded[index], b""))
                else:
                    answers.append(self.answer(model, header, results[index]))
            except Exception as e:  # noqa: BLE001 - one request's error is its own answer, never its neighbours'
                answers.append(e)
        return answers

    def answer(self, model: str, header: dict[str, Any], result: Any) -> tuple[dict[str, Any], bytes]:
        """The OIP answer to ``header`` from a ``PredictResult``: the outputs it asks for, JSON or binary."""
        wanted = oip.requested_outputs(header)
        available = {**result.raw, **result.outputs} if wanted else result.outputs
        missing = [n for n in wanted if n not in available]
        if missing:
            raise HttpError(400, f"model '{model}' has no output(s) {', '.join(missing)}")
        tensors, binary_out = oip.encode_outputs(available, wanted, oip.binary_output_default(header))
        parameters = {"source": result.source, "latency_ms": round(result.latency_ms, 3), "postprocessed": True}
        if result.fallback_reason is not None:  # OIP parameters are strings, numbers or booleans, never null
            parameters["fallback_reason"] = result.fallback_reason
        answer = {"model_name": model, "model_version": None if result.version is None else str(result.version),
                  "outputs": tensors, "parameters": parameters}  # fmt: skip
        if "id" in header:
            answer["id"] = header["id"]
        return answer, binary_out

    def decode(self, header: dict[str, Any], binary: bytes, manifest: Manifest | None) -> dict[str, np.ndarray]:
        """The request's tensors; NaN and infinities only in inputs whose schema allows them.

        The shapes are checked by the serving pipeline, so that a bundle that cannot take live inputs
        is counted (errors, fallbacks) and rolled back, and the fallback chain can still answer. When
        nothing local serves the model the device has no schema: the cloud, which applies the model's,
        decides about non-finite values (it refuses them where the schema does not allow them).
        """
        return oip.decode_inputs(header, binary, self._non_finite_allowed(manifest))

    def decode_many(
        self, requests: list[tuple[dict[str, Any], bytes]], manifest: Manifest | None
    ) -> list[dict[str, np.ndarray] | InputError]:
        """:meth:`decode` for several requests of one model (:func:`bundles.oip.decode_inputs_many`): each
        gets its tensors or its own error."""
        return oip.decode_inputs_many(requests, self._non_finite_allowed(manifest))

    def _non_finite_allowed(self, manifest: Manifest | None) -> Collection[str]:
        if manifest is None and getattr(self.agent, "engine", None) is not None:
            return _EVERY_INPUT
        return () if manifest is None else {t.name for t in manifest.inputs if _allows_non_finite(t)}


def _encoded_together(
    model: str, requests: list[tuple[dict[str, Any], dict[str, np.ndarray]]], results: list[Any] | None
) -> dict[int, bytes]:
    """The JSON answers of the requests answered together that ask for every output as JSON and carry no id
    (most), written in one pass by request index (:func:`bundles.oip.encode_answers_many`: the bytes
    :meth:`InferenceApi.answer` and ``dumps_answer`` would give). Their provenance is the shared call's."""
    if results is None:
        return {}
    plain = [i for i, (h, _) in enumerate(requests) if "outputs" not in h and "parameters" not in h and "id" not in h]
    if len(plain) < 2:
        return {}
    first = results[plain[0]]
    if first.fallback_reason is not None or any(
        (r.source, r.version, r.latency_ms, r.fallback_reason) != (first.source, first.version, first.latency_ms, None)
        for r in (results[i] for i in plain)
    ):
        return {}  # not one shared call's local answers: each is written alone
    head = {"model_name": model, "model_version": None if first.version is None else str(first.version)}
    tail = {"parameters": {"source": first.source, "latency_ms": round(first.latency_ms, 3), "postprocessed": True}}
    return dict(zip(plain, oip.encode_answers_many(head, [results[i].outputs for i in plain], tail), strict=True))


class _EveryName:
    """A collection that holds every input name."""

    def __contains__(self, _name: object) -> bool:
        return True

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


_EVERY_INPUT = _EveryName()


def _allows_non_finite(spec: TensorSpec) -> bool:
    return spec.extra.get("allow_non_finite") is True


def error_status(e: Exception) -> tuple[int, int | None]:
    """HTTP status (and Retry-After seconds) for an error raised while answering."""
    if isinstance(e, HttpError):
        return e.status, e.retry_after_s
    if isinstance(e, RequestTooLargeError):
        return 413, None
    if isinstance(e, UnsupportedEncodingError):
        return 415, None
    if isinstance(e, BusyError):
        return 503, 1
    if isinstance(e, (InputError, ConfigError)):
        return 400, None
    if isinstance(e, ModelNotReadyError):
        return 503, 5
    if isinstance(e, (InferenceError, EdgeFleetError)):
        return 503, 1
    return 500, None


@dataclass(frozen=True)
class HttpSettings:
    """The localhost server's limits (``[http]`` and ``[serving]`` in agent.toml, see docs/agent.md)."""

    host: str = "127.0.0.1"
    port: int = 8181
    threads: int = 4
    backlog: int = 1024
    connection_limit: int = 256
    read_timeout_s: float = 10.0
    min_read_rate_bytes_s: int = 500
    idle_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 64 * 2**20
    memory_budget_bytes: int = 256 * 2**20
    max_batch: int = 64
    queue_timeout_s: float = 1.0
    fast_path: FastPathSettings = FastPathSettings()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Payload Too Large", 415: "Unsupported Media Type",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
_DECLARED_SHAPE = re.compile(rb'"shape"\s*:\s*\[([^\]]{0,200})\]')
_PRESCAN_BYTES = 64 * 1024


class OipApp:
    """The WSGI application: routing, body limits, decoding, admission; :class:`InferenceApi` does the rest."""

    def __init__(self, api: InferenceApi, settings: HttpSettings, fast_path: FastPath | None = None) -> None:
        self.api, self.settings, self.fast_path = api, settings, fast_path
        self.budget = MemoryBudget(settings.memory_budget_bytes, settings.queue_timeout_s)
        self._caps: dict[tuple[str | None, bool], tuple[Manifest | None, int]] = {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/v1/"):
            return self._openai(environ, start_response)
        retry_after: int | None = None
        try:
            answer, binary = self._route(environ)
            status = 200
        except Exception as e:  # every error becomes a JSON answer, never a traceback
            status, retry_after = error_status(e)
            if status == 500:
                log.exception("http: unexpected error")
            answer, binary = {"error": str(e) if status != 500 else "internal error"}, b""
        body = answer if isinstance(answer, bytes) else oip.dumps_answer(answer)
        headers = [("Content-Type", "application/json" if not binary else "application/octet-stream"),
                   ("Content-Length", str(len(body) + len(binary)))]  # fmt: skip
        if binary:
            headers.append(("Inference-Header-Content-Length", str(len(body))))
        if retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
        return [body + binary] if binary else [body]

    def _openai(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The OpenAI-compatible routes: JSON answers, server-sent events, OpenAI-style error objects."""
        from device_agent.llm import ROUTES, GenerationError

        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "").rstrip("/")
        headers: list[tuple[str, str]] = []
        try:
            if method == "GET" and path == "/v1/models":
                return _json_answer(start_response, 200, self.api.openai_models())
            if method != "POST" or path not in ROUTES:
                raise HttpError(404, f"no such endpoint: {method} {path}")
            answer = self.api.llm.answer(path, oip.parse_header(self._openai_body(environ), allow_constants=True))
        except Exception as e:  # every error becomes an OpenAI error object, never a traceback
            status, retry_after = error_status(e)
            if status == 500:
                log.exception("http: unexpected error")
            kind = "invalid_request_error" if status in (400, 404, 413) else "server_error"
            param = e.param if isinstance(e, GenerationError) else None
            message = str(e) if status != 500 else "internal error"
            if retry_after is not None:
                headers.append(("Retry-After", str(retry_after)))
            error = {"error": {"message": message, "type": kind, "param": param, "code": None}}
            return _json_answer(start_response, status, error, headers)
        headers += list(answer.headers.items())
        if answer.events is None:
            return _json_answer(start_response, 200, answer.json or {}, headers)
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), *headers])
        events: Iterable[bytes] = answer.events
        return events

    def _openai_body(self, environ: dict[str, Any]) -> bytes:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        cap = min(self.settings.max_body_bytes, _OPENAI_MAX_BODY_BYTES)
        if length > cap:
            raise RequestTooLargeError(f"the request body is {length} bytes; the OpenAI routes take at most {cap}")
        raw = environ["wsgi.input"].read(length) if length else b""
        return oip.inflate(raw, environ.get("HTTP_CONTENT_ENCODING", ""), cap)

    def _route(self, environ: dict[str, Any]) -> Answer:
        prepared = environ.pop(PREPARED_ANSWER, None)
        if isinstance(prepared, Exception):
            raise prepared
        if prepared is not None:
            return prepared  # type: ignore[no-any-return]
        target = _inference_target(environ)
        if target is not None:
            return self._infer(environ, *target)
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "").rstrip("/")
        parts = path.split("/")
        if method not in ("GET", "HEAD"):
            raise HttpError(404, f"no such endpoint: {method} {path}")
        api = self.api
        routes: dict[str, Callable[[], dict[str, Any]]] = {
            "/v2/health/live": api.live, "/v2/health/ready": api.ready, "/v2": api.server_metadata,
            "/edgefleet/status": api.status,
        }  # fmt: skip
        if path in routes:
            return routes[path](), b""
        if len(parts) == 4 and parts[:3] == ["", "v2", "models"]:
            return api.model_metadata(parts[3]), b""
        if len(parts) == 5 and parts[:3] == ["", "v2", "models"] and parts[4] == "ready":
            return api.model_ready(parts[3]), b""
        raise HttpError(404, f"no such endpoint: GET {path}")

    def _infer(self, environ: dict[str, Any], model: str, version: str | None) -> Answer:
        staged = self._stage(environ, model, version)
        try:
            outcome: Answer | Exception = self.api.infer_decoded(model, staged.header, staged.inputs, version)
        except (InferenceError, ModelNotReadyError, BusyError) as e:
            outcome = e
        finally:
            self.budget.release(staged.cost)
        return self._after(environ, model, outcome)

    def _target_manifest(self, model: str, version: str | None) -> Manifest | None:
        """404 for a model or version this device does not serve; else the served manifest (None: no schema)."""
        self.api.await_start_up()  # the version served and the model's schema are known once start-up loaded it
        self.api.check_target(model, version)
        return self.api.manifest(model)

    def _stage(self, environ: dict[str, Any], model: str, version: str | None) -> _Staged:
        """An inference request up to its decoded inputs (404, limits, inflation, parsing), its parse cost held
        in the memory budget (the caller releases ``cost``)."""
        manifest = self._target_manifest(model, version)
        header, payload, cost = self._parse(environ, model, manifest)
        try:
            return _Staged(header, self.api.decode(header, payload, manifest), cost)
        except BaseException:
            self.budget.release(cost)
            raise

    def _parse(
        self, environ: dict[str, Any], model: str, manifest: Manifest | None
    ) -> tuple[dict[str, Any], bytes, int]:
        """A request's JSON header and binary payload (limits, inflation, parsing), and its parse cost, held in
        the memory budget (the caller releases it)."""
        header_bytes, payload, cost = self._body(environ, model, manifest)
        self.budget.acquire(cost)
        try:
            return oip.parse_header(header_bytes, allow_constants=True), payload, cost
        except BaseException:
            self.budget.release(cost)
            raise

    def _body(self, environ: dict[str, Any], model: str, manifest: Manifest | None) -> tuple[bytes, bytes, int]:
        """A request's body read, inflated and split (limits first; the declared shapes pre-scanned): its JSON
        header, its binary payload, and what parsing it may cost in memory."""
        binary = "HTTP_INFERENCE_HEADER_CONTENT_LENGTH" in environ
        length = int(environ.get("CONTENT_LENGTH") or 0)  # the server refused a malformed one (400)
        cap = self._body_cap(manifest, binary)
        if length > cap:
            raise RequestTooLargeError(f"the request body is {length} bytes; '{model}' takes at most {cap}")
        raw = environ["wsgi.input"].read(length) if length else b""
        body = oip.inflate(raw, environ.get("HTTP_CONTENT_ENCODING", ""), cap)
        header_bytes, payload = oip.split_body(body, environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"))
        if manifest is not None and not binary:
            _prescan_shapes(header_bytes, manifest, self.settings.max_batch)
        return header_bytes, payload, parse_cost_bytes(len(body), binary)

    def _parse_group(
        self, environs: list[dict[str, Any]], model: str, manifest: Manifest | None
    ) -> tuple[list[tuple[dict[str, Any], dict[str, Any], bytes]], int]:
        """:meth:`_parse` for a route's requests: (environ, header, payload) of those parsed, and the budget
        they hold (the caller releases it). Their parse costs are reserved with one lock round trip when they
        fit now; otherwise each that fits beside those reserved is, and the rest are left to their own turn,
        their body read again (never waiting here: the budget they would wait for is their neighbours', held on
        this thread until the group is answered). A request that fails gets its error as its answer."""
        bodies: list[tuple[dict[str, Any], bytes, bytes, int]] = []
        for environ in environs:
            try:
                bodies.append((environ, *self._body(environ, model, manifest)))
            except Exception as e:  # noqa: BLE001 - the request's own answer, sent by __call__
                environ[PREPARED_ANSWER] = e
        total = sum(cost for *_, cost in bodies)
        reserved_together = self.budget.try_acquire(total)
        held = total if reserved_together else 0
        parsed: list[tuple[dict[str, Any], dict[str, Any], bytes]] = []
        for environ, header_bytes, payload, cost in bodies:
            if not reserved_together:
                if not self.budget.try_acquire(cost):
                    environ["wsgi.input"].seek(0)  # served alone on its turn: it waits for room, as it would alone
                    continue
                held += cost
            try:
                parsed.append((environ, oip.parse_header(header_bytes, allow_constants=True), payload))
            except Exception as e:  # noqa: BLE001 - as above
                environ[PREPARED_ANSWER] = e
        return parsed, held

    def _after(
        self, environ: dict[str, Any], model: str, outcome: Answer | Exception, deadline_thread: bool | None = None
    ) -> Answer:
        """Tell the fast path what an inference answer says of its route; the answer, or its error raised.
        ``deadline_thread``: whether the model's calls run on the deadline thread, if the caller knows."""
        if isinstance(outcome, (InferenceError, ModelNotReadyError, BusyError)):
            self._route_blocked(environ)  # the fallback chain was tried, or the device is full
        if isinstance(outcome, Exception):
            raise outcome
        if isinstance(outcome[0], dict) and "fallback_reason" in outcome[0]["parameters"]:  # bytes: local answers
            self._route_blocked(environ)
        elif self.fast_path is not None and (
            self.api.waits_on_deadline_thread(model) if deadline_thread is None else deadline_thread
        ):
            route = FastPath.route(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))
            if route is not None:  # its thread's CPU time does not show the model's: not a measurement
                self.fast_path.remeasure(route)
        return outcome

    def prepare_together(self, environs: list[dict[str, Any]]) -> None:
        """Answer several inference requests of one route with one model call (the fast lane's dynamic
        batching, :class:`~device_agent.fastpath.FastPathDispatcher`): each environ gets its answer, or the
        error that is its answer, under ``PREPARED_ANSWER``, which :meth:`__call__` then sends as its own.

        Each request is staged alone (a bad one is refused alone, with the same error as when it comes by
        itself); those staged run together when the pipeline can batch them, else one by one.
        """
        target = _inference_target(environs[0]) if environs else None
        if target is None:
            return
        model, version = target
        path = environs[0]["PATH_INFO"]
        try:
            manifest = self._target_manifest(model, version)  # the same for every request of the route
        except Exception as e:  # noqa: BLE001 - a 404 (or start-up's error): every request's answer
            for environ in environs:
                if environ["PATH_INFO"] == path:
                    environ[PREPARED_ANSWER] = e
            return
        mine = [e for e in environs if e["PATH_INFO"] == path and e["REQUEST_METHOD"] == "POST"]  # the caller groups
        parsed, cost = self._parse_group(mine, model, manifest)  # by route: others are served on their own turn
        try:
            staged: list[tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]] = []
            decoded = self.api.decode_many([(header, payload) for _, header, payload in parsed], manifest)
            for (environ, header, _), inputs in zip(parsed, decoded, strict=True):
                if isinstance(inputs, Exception):
                    environ[PREPARED_ANSWER] = inputs
                else:
                    staged.append((environ, header, inputs))
            if not staged:
                return
            outcomes = self.api.infer_together(model, [(header, inputs) for _, header, inputs in staged], version)
        finally:
            self.budget.release(cost)
        deadline_thread = self.api.waits_on_deadline_thread(model)  # once for the route's requests
        for (environ, _, _), outcome in zip(staged, outcomes, strict=True):
            if not deadline_thread and type(outcome) is tuple and type(outcome[0]) is bytes:
                environ[PREPARED_ANSWER] = outcome  # a local answer written together: nothing to tell the lane
                continue
            try:
                environ[PREPARED_ANSWER] = self._after(environ, model, outcome, deadline_thread)
            except Exception as e:  # noqa: BLE001 - as above
                environ[PREPARED_ANSWER] = e

    def _route_blocked(self, environ: dict[str, Any]) -> None:
        """Tell the fast path that this route's answers may wait (on the network, on admission)."""
        route = FastPath.route(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))
        if self.fast_path is not None and route is not None:
            self.fast_path.blocked(route)

    def _body_cap(self, manifest: Manifest | None, binary: bool) -> int:
        """The largest decoded body accepted for this model (its schema), never over the device's limit;
        remembered for the manifest served (computed again when another is)."""
        key = (None if manifest is None else manifest.name, binary)
        known = self._caps.get(key)
        if known is not None and known[0] is manifest:
            return known[1]
        device = self.settings.max_body_bytes
        model = None if manifest is None else model_max_body_bytes(manifest, self.settings.max_batch, binary)
        cap = device if model is None else min(device, model)
        self._caps[key] = (manifest, cap)
        return cap


_OPENAI_MAX_BODY_BYTES = 4 * 2**20


class _Staged(NamedTuple):
    """An inference request decoded, waiting for its model call; ``cost`` is held in the memory budget."""

    header: dict[str, Any]
    inputs: dict[str, np.ndarray]
    cost: int


def _inference_target(environ: dict[str, Any]) -> tuple[str, str | None] | None:
    """(model, version or None) of an inference request, else None (the same rule as ``OipApp._route``)."""
    parts = environ.get("PATH_INFO", "").rstrip("/").split("/")
    if environ["REQUEST_METHOD"] != "POST" or len(parts) not in (5, 7) or parts[:3] != ["", "v2", "models"]:
        return None
    if parts[-1] != "infer" or (len(parts) == 7 and parts[4] != "versions"):
        return None
    return parts[3], parts[5] if len(parts) == 7 else None


def _json_answer(start_response: Callable[..., Any], status: int, answer: dict[str, Any],
                 headers: list[tuple[str, str]] | None = None) -> list[bytes]:  # fmt: skip
    body = oip.dumps_answer(answer)
    basics = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response(f"{status} {_REASONS.get(status, 'Error')}", [*basics, *(headers or [])])
    return [body]


def _prescan_shapes(header: bytes, manifest: Manifest, max_batch: int) -> None:
    """Refuse from the body's first bytes a declared shape that holds more elements than the model takes."""
    if len(header) <= _PRESCAN_BYTES:
        return  # small: parsing is cheap, the full check follows
    limit = model_max_elements(manifest, max_batch)
    if limit is None:
        return
    for match in _DECLARED_SHAPE.finditer(header, 0, _PRESCAN_BYTES):
        dims = [d.strip() for d in match.group(1).split(b",") if d.strip()]
        if all(d.isdigit() for d in dims) and math.prod(int(d) for d in dims) > limit:
            shape = [int(d) for d in dims]
            raise HttpError(400, f"declared shape {shape} holds more elements than '{manifest.name}' takes ({limit})")


def http_settings(config: Any) -> HttpSettings:
    """The server's settings from an :class:`~device_agent.config.AgentConfig` (automatic limits resolved)."""
    from device_agent.admission import default_max_body_bytes, default_memory_budget_bytes

    budget = config.memory_budget_bytes or default_memory_budget_bytes()
    return HttpSettings(
        host=config.http_host, port=config.http_port, threads=config.http_threads or config.max_concurrency,
        backlog=config.http_backlog, connection_limit=config.http_connection_limit,
        read_timeout_s=config.http_read_timeout_s, min_read_rate_bytes_s=config.http_min_read_rate_bytes_s,
        idle_timeout_s=config.http_idle_timeout_s,
        max_body_bytes=config.max_body_bytes or default_max_body_bytes(budget), memory_budget_bytes=budget,
        max_batch=config.max_batch, queue_timeout_s=config.queue_timeout_s,
        fast_path=FastPathSettings(enabled=config.http_inline_max_cpu_ms > 0,
                                   fast_cpu_s=config.http_inline_max_cpu_ms / 1000),
    )  # fmt: skip


class AgentHttpServer:
    """The OIP server for one agent on waitress, in a background thread (see docs/dependencies.md).

    waitress reads requests on one I/O thread (a slow or silent client costs a socket, not a worker),
    refuses a malformed ``Content-Length`` (400) and a body over ``max_body_bytes`` (413) from the
    headers, spools bodies past 512 KiB to a temporary file, and hands complete requests to
    ``threads`` workers in arrival order. On top: a request whose headers and body are not in within
    ``read_timeout_s``, plus a second for every ``min_read_rate_bytes_s`` bytes received so far, is
    dropped (waitress alone only times out idle connections). The allowance is Apache
    mod_reqtimeout's ``MinRate``: a client dripping bytes is cut off, a large body arriving at any
    useful rate is not (a 60 MB upload on a loaded device takes seconds).
    """

    def __init__(
        self, agent: Any, host: str = "127.0.0.1", port: int = 8181, settings: HttpSettings | None = None,
        app: Callable[..., Any] | None = None,
    ) -> None:  # fmt: skip
        """``app`` replaces the OIP application (the HTTP benchmark's fixed answer, on the same stack)."""
        import waitress.server

        self.settings = dataclasses.replace(settings or HttpSettings(), host=host, port=port)
        self.fast_path = FastPath(self.settings.fast_path, _engine_has_room(agent))
        self.app = OipApp(InferenceApi(agent), self.settings, self.fast_path)
        cfg = self.settings
        self.server: Any = waitress.server.create_server(
            app or self.app, host=cfg.host, port=cfg.port, threads=cfg.threads, backlog=cfg.backlog,
            connection_limit=cfg.connection_limit, channel_timeout=cfg.idle_timeout_s, cleanup_interval=1,
            max_request_header_size=cfg.max_header_bytes, max_request_body_size=cfg.max_body_bytes,
            ident=f"edgefleet-agent/{AGENT_VERSION}", expose_tracebacks=False, log_socket_errors=False,
            asyncore_use_poll=True, clear_untrusted_proxy_headers=True,
        )  # fmt: skip
        self.server.channel_class = _deadline_channel(self.server.channel_class)
        prepare = self.app.prepare_together if app is None else None  # dynamic batching: the OIP application's
        self.dispatcher = FastPathDispatcher(self.server.task_dispatcher, self.fast_path, self.server.adj, prepare)
        self.server.task_dispatcher = self.dispatcher
        maintenance = self.server.maintenance

        def maintenance_with_deadline(now: float) -> None:
            maintenance(now)
            for channel in list(self.server.active_channels.values()):
                began = getattr(channel, "request_began", None)
                if channel.request is None or began is None:
                    continue
                allowed_s = cfg.read_timeout_s + channel.request_bytes / cfg.min_read_rate_bytes_s
                if now - began > allowed_s:
                    channel.will_close = True  # headers or body still not in: drop the connection

        self.server.maintenance = maintenance_with_deadline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.server.effective_host}:{self.server.effective_port}"

    def start(self) -> AgentHttpServer:
        self._thread = threading.Thread(target=self._loop, name="edgefleet-http", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        from waitress import wasyncore

        self.dispatcher.io_thread = threading.get_ident()
        while not self._stop.is_set():
            timeout_s = 0.0 if self.dispatcher.has_pending else 0.05
            wasyncore.loop(timeout=timeout_s, map=self.server._map, use_poll=True, count=1)  # noqa: SLF001
            self.dispatcher.run_pending()
        self.server.task_dispatcher.shutdown()
        wasyncore.close_all(self.server._map)  # noqa: SLF001

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _engine_has_room(agent: Any) -> Callable[[], bool]:
    """Whether the agent's engine would admit a request now without waiting (a stand-in agent always would)."""
    engine = getattr(agent, "engine", None)
    stats, limit = getattr(engine, "stats", None), getattr(engine, "max_concurrency", None)
    if stats is None or not isinstance(limit, int):
        return lambda: True
    return lambda: stats.running < limit and not stats.waiting


def _deadline_channel(base: type) -> type:
    """waitress's channel, remembering when the request being received began and how many bytes of it came
    (for ``read_timeout_s`` and ``min_read_rate_bytes_s``)."""

    class DeadlineChannel(base):  # type: ignore[valid-type, misc]
        task_class = staticmethod(prepared_task_factory(getattr(base, "task_class")))  # noqa: B009 - waitress's
        request_began: float | None = None
        request_bytes = 0

        def received(self, data: bytes) -> bool:
            if self.request is None and data:
                self.request_began, self.request_bytes = time.time(), 0
            self.request_bytes += len(data)
            return bool(super().received(data))

    return DeadlineChannel

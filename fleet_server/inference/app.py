"""The cloud inference app: the Open Inference Protocol (KServe v2 REST) over the fleet's bundles.

Routes (``docs/inference.md``): ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
``GET /v2/models/{name}[/versions/{v}]`` and ``.../ready``, ``POST .../infer``; the repository
extension ``POST /v2/repository/index``, ``POST /v2/repository/models/{name}/load`` and ``/unload``;
``GET /metrics``; for GGUF bundles the OpenAI-compatible ``POST /v1/chat/completions``,
``POST /v1/completions`` and ``GET /v1/models`` (:mod:`~fleet_server.inference.openai_routes`).
Health and server metadata are open (load balancers probe them); everything else
takes a device token or an admin API key (:mod:`fleet_server.inference.access`).

Flow of an inference request: caller (cached token check, device rate limit, the fleet's models)
-> body read under ``max_body_bytes`` -> ``Content-Encoding`` inflated under the same limit ->
JSON header parsed -> the version resolved (asked, the device's own, or newest) and loaded if needed
(:mod:`~fleet_server.inference.repository`) -> tensors decoded (:mod:`bundles.oip`; NaN and
infinities only in inputs whose schema allows them, as on a device) -> the inputs checked against
the model -> the model's runner (dynamic batcher or direct) -> outputs selected and encoded, JSON or
binary. Handlers read the raw body themselves (no body model), so a request needs no
``Content-Type`` and the hot path costs no validation layer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.routing import Route

from bundles import oip
from bundles.errors import EdgeFleetError, InputError, ModelNotReadyError, RequestTooLargeError
from fleet_server import __version__
from fleet_server.db import make_engine, make_session_factory
from fleet_server.inference import errors, heap
from fleet_server.inference.access import Access, Caller
from fleet_server.inference.batching import make_runner
from fleet_server.inference.metrics import InferenceMetrics, exposition
from fleet_server.inference.models import ServedModel
from fleet_server.inference.openai_routes import add_openai_routes
from fleet_server.inference.repository import Catalog, Key, ModelRepository
from fleet_server.inference.settings import Configured
from fleet_server.inference.source import VerifiedBundles
from fleet_server.services.tuf_host import TufHost

log = logging.getLogger("fleet_server.inference")
DEADLINE_HEADER = "inference-deadline-ms"
_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "datatype": {"type": "string", "enum": list(oip.DATATYPES)}, "parameters": {"type": "object"},
    "data": {"type": "array"}}}  # fmt: skip
INFER_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": _TENSOR},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "parameters": {"type": "object"}}}},
        }}}}},
    "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "schema": {"type": "integer", "minimum": 0}},
                   {"name": "Inference-Deadline-Ms", "in": "header", "required": False,
                    "schema": {"type": "number", "exclusiveMinimum": 0}}],
}  # fmt: skip
PATH_PARAMETERS: list[dict[str, Any]] = [
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
]
REPOSITORY_BODY: dict[str, Any] = {
    "requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"parameters": {"type": "object", "properties": {
            "version": {"type": "string"}}}}}}}},
}  # fmt: skip
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": meaning, "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}
    for status, meaning in ((400, "bad request"), (401, "no or unknown credentials"), (403, "not allowed"),
                            (404, "no such model or version"), (413, "body over the limit"),
                            (415, "unsupported Content-Encoding"), (429, "queue full or rate limited"),
                            (503, "not ready"), (504, "deadline passed"))
}  # fmt: skip


class Endpoint:
    """Everything the routes share: settings, database, access, the model repository, metrics."""

    def __init__(self, configured: Configured) -> None:
        self.configured = configured
        self.settings = configured.inference
        server = configured.server
        self.engine = make_engine(server.resolved_database_url, sqlite_busy_timeout_ms=server.sqlite_busy_timeout_ms)
        self.session_factory = make_session_factory(self.engine)
        self.access = Access(
            self.session_factory, server, self.settings.auth_cache_s, self.settings.device_rate_per_minute
        )
        self.metrics = InferenceMetrics()
        self.executor = concurrent.futures.ThreadPoolExecutor(self.settings.threads, "edgefleet-infer")
        self.catalog = Catalog(self.session_factory)
        self._repository: ModelRepository | None = None
        self.eager: list[str] = []
        self.eager_done = False
        self.eager_problem: str | None = None

    @property
    def repository(self) -> ModelRepository:
        """The repository (built on first use: the TUF root may be installed after the endpoint started)."""
        if self._repository is None:
            bundles = VerifiedBundles(TufHost(self.configured.server).storage, self.configured.trusted_root,
                                      self.configured.cache_dir)  # fmt: skip
            self._repository = ModelRepository(
                bundles, self.catalog, self._runner, int(self.settings.memory_budget_mb * 2**20),
                self.settings.memory_per_byte, self._loaded_changed,
            )  # fmt: skip
        return self._repository

    def _runner(self, model: ServedModel) -> Any:
        return make_runner(model, self.executor, self.metrics, self.settings)

    def _loaded_changed(self, count: int, used_bytes: int) -> None:
        self.metrics.loaded_models.set(count)
        self.metrics.loaded_bytes.set(used_bytes)
        heap.settle()  # the model's objects live long: out of the collector's sight

    async def load_eager(self) -> None:
        """Load the ``models`` setting (``eager``: every published model's newest version when it is empty)."""
        try:
            wanted = list(self.settings.models)
            if self.settings.loading == "eager" and not wanted:
                wanted = sorted((await asyncio.to_thread(self.catalog.versions)).keys())
            self.eager = wanted
            for ref in wanted:
                name, _, version = ref.partition("@")
                await self.repository.load(await self.repository.resolve(name, version or None))
        except EdgeFleetError as e:
            self.eager_problem = str(e)
            log.error("inference: could not load the configured models: %s", e)
        self.eager_done = True

    async def close(self) -> None:
        if self._repository is not None:
            await self._repository.close()
            self._repository.bundles.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()


def create_inference_app(configured: Configured) -> FastAPI:
    """The inference app for these settings (one per worker process)."""
    endpoint = Endpoint(configured)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        with heap.serving_collector():
            heap.settle()
            task = asyncio.create_task(endpoint.load_eager())
            try:
                yield
            finally:
                task.cancel()
                await endpoint.close()

    app = FastAPI(
        title="edgefleet cloud inference", version=__version__, lifespan=lifespan,
        description="The Open Inference Protocol (KServe v2 REST) over the fleet's signed bundles.",
    )  # fmt: skip
    app.state.endpoint = endpoint
    errors.install(app)
    _health_routes(app, endpoint)
    _model_routes(app, endpoint)
    _repository_routes(app, endpoint)
    add_openai_routes(app, endpoint)
    return app


# --- health and metadata -------------------------------------------------------------------------------


def _health_routes(app: FastAPI, endpoint: Endpoint) -> None:
    @app.get("/v2/health/live", tags=["health"], responses=ERROR_RESPONSES)
    async def live() -> dict[str, Any]:
        """The process answers."""
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"], responses=ERROR_RESPONSES)
    async def ready() -> dict[str, Any]:
        """Ready when the configured models are loaded and self-tested (lazy: when bundles can be read)."""
        if not endpoint.eager_done:
            raise ModelNotReadyError("loading the configured models")
        if endpoint.eager_problem is not None:
            raise ModelNotReadyError(f"a configured model could not be loaded: {endpoint.eager_problem}")
        _ = endpoint.repository  # the trusted root is in place
        return {"ready": True}

    @app.get("/v2", tags=["health"], responses=ERROR_RESPONSES)
    async def server_metadata() -> dict[str, Any]:
        """Name, version and the protocol extensions this server speaks."""
        return {"name": "edgefleet", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def metrics() -> Response:
        return Response(exposition(endpoint.metrics), media_type="text/plain; version=0.0.4")


def _model_routes(app: FastAPI, endpoint: Endpoint) -> None:
    async def metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
        caller, key = await _target(endpoint, request, name, version)
        async with endpoint.repository.use(key) as entry:
            return entry.model.metadata()

    async def model_ready(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
        caller, key = await _target(endpoint, request, name, version)
        if endpoint.repository.loaded(key) is None:
            failure = endpoint.repository.failure(key)
            why = f"its load failed: {failure}" if failure else "not loaded yet (the first request loads it)"
            raise ModelNotReadyError(f"model '{name}' version {key[1]} is not ready: {why}")
        return {"name": name, "version": str(key[1]), "ready": True}

    async def infer(request: Request) -> Response:
        params = request.path_params
        return await _infer(endpoint, request, params["name"], params.get("version"))

    tags = list[str | Enum](["inference"])
    for prefix in ("/v2/models/{name}/versions/{version}", "/v2/models/{name}"):
        path_params = [p for p in PATH_PARAMETERS if "{" + p["name"] + "}" in prefix]
        extra = {**INFER_BODY, "parameters": path_params + INFER_BODY["parameters"]}
        app.add_api_route(prefix + "/infer", infer, methods=["POST"], tags=tags, responses=ERROR_RESPONSES,
                          openapi_extra=extra, summary="Run an inference")  # fmt: skip
    _serve_infer_first(app, infer)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, metadata, methods=["GET"], tags=tags, responses=ERROR_RESPONSES,
                          summary="Model metadata")  # fmt: skip
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"], tags=tags, responses=ERROR_RESPONSES,
                          summary="Model readiness")  # fmt: skip


def _serve_infer_first(app: FastAPI, infer: Callable[[Request], Awaitable[Response]]) -> None:
    """Answer the two infer paths with plain Starlette routes, tried before every other route.

    The FastAPI routes above stay for the OpenAPI schema (and would answer identically); the hot
    path skips FastAPI's dependency resolution and the walk past the docs and health routes, about
    a third of the endpoint's own CPU per request with a small model (docs/benchmarks.md). Errors
    still reach the app's exception handlers, which wrap every route.
    """
    fast = [Route(prefix + "/infer", infer, methods=["POST"])
            for prefix in ("/v2/models/{name}/versions/{version}", "/v2/models/{name}")]  # fmt: skip
    app.router.routes[:0] = fast


async def _target(endpoint: Endpoint, request: Request, name: str, version: str | None) -> tuple[Caller, Key]:
    caller = await endpoint.access.caller(request.headers.get("authorization"))
    caller.check_model(name)
    key = await endpoint.repository.resolve(name, version, caller.assigned_version(name))
    return caller, key


# --- inference -----------------------------------------------------------------------------------------


async def _infer(endpoint: Endpoint, request: Request, name: str, version: str | None) -> Response:
    started = time.perf_counter()
    status = "error"
    label = "unknown"
    try:
        caller, key = await _target(endpoint, request, name, version)
        label = name
        deadline = _deadline(request.headers.get(DEADLINE_HEADER))
        header, payload = await _request_parts(endpoint, request)
        wanted = oip.requested_outputs(header)
        default_binary = oip.binary_output_default(header)
        async with endpoint.repository.use(key) as entry:
            inputs = oip.decode_inputs(header, payload, getattr(entry.model, "non_finite_inputs", frozenset()))
            rows = entry.model.check(inputs)
            outputs = await entry.runner.submit(inputs, rows, deadline)
        response = _answer(name, key[1], header, outputs, wanted, default_binary)
        status = "ok"
        return response
    finally:
        endpoint.metrics.request_done(label, status, time.perf_counter() - started if status == "ok" else None)


def _deadline(value: str | None) -> float | None:
    """The request's deadline (monotonic seconds) from ``Inference-Deadline-Ms`` (relative milliseconds)."""
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        raise InputError("Inference-Deadline-Ms must be a number of milliseconds") from None
    if not 0 < ms < 3.6e6:
        raise InputError("Inference-Deadline-Ms must be between 0 and 3600000")
    return time.monotonic() + ms / 1000.0


async def _request_parts(endpoint: Endpoint, request: Request) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary payload; inputs are decoded once the model is known, because NaN and
    infinities are refused except in inputs whose schema allows them (``allow_non_finite``, as on a device)."""
    limit = endpoint.settings.max_body_bytes
    raw = await _body(request, limit)
    body = oip.inflate(raw, request.headers.get("content-encoding", ""), limit)
    header_bytes, payload = oip.split_body(body, request.headers.get("inference-header-content-length"))
    return oip.parse_header(header_bytes, allow_constants=True), payload


async def _body(request: Request, limit: int) -> bytes:
    """The raw body, refused (413) as soon as it is over ``limit`` bytes, declared or sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"the request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"the request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(
    name: str, version: int, header: dict[str, Any], outputs: dict[str, Any], wanted: dict[str, bool],
    default_binary: bool,
) -> Response:  # fmt: skip
    missing = [n for n in wanted if n not in outputs]
    if missing:
        raise InputError(f"model '{name}' has no output(s) {', '.join(missing)} (it has {', '.join(outputs)})")
    tensors, binary = oip.encode_outputs(outputs, wanted, default_binary)
    # ``postprocessed``: the outputs hold the bundle's post-processed tensors (a device must not apply it again)
    parameters = {"postprocessed": True}
    answer: dict[str, Any] = {"model_name": name, "model_version": str(version), "outputs": tensors}
    answer["parameters"] = parameters
    if "id" in header:
        answer["id"] = header["id"]
    body = oip.dumps_answer(answer)
    if not binary:
        return Response(body, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(len(body))}
    return Response(body + binary, media_type="application/octet-stream", headers=headers)


# --- repository extension ------------------------------------------------------------------------------


def _repository_routes(app: FastAPI, endpoint: Endpoint) -> None:
    @app.post("/v2/repository/index", tags=["repository"], responses=ERROR_RESPONSES)
    async def index(request: Request) -> JSONResponse:
        """Every published model version and its state (``READY``, ``UNLOADED``, ``UNAVAILABLE`` with a reason)."""
        caller = await endpoint.access.caller(request.headers.get("authorization"))
        caller.check_role("viewer")
        return JSONResponse(await endpoint.repository.index())

    @app.post("/v2/repository/models/{name}/load", tags=["repository"], responses=ERROR_RESPONSES,
              openapi_extra=REPOSITORY_BODY)  # fmt: skip
    async def load(request: Request, name: str) -> dict[str, Any]:
        """Load a model (``parameters.version``, else its newest version); operator keys only."""
        key = await _repository_target(endpoint, request, name)
        await endpoint.repository.load(key)
        return {"name": name, "version": str(key[1]), "state": "READY"}

    @app.post("/v2/repository/models/{name}/unload", tags=["repository"], responses=ERROR_RESPONSES,
              openapi_extra=REPOSITORY_BODY)  # fmt: skip
    async def unload(request: Request, name: str) -> dict[str, Any]:
        """Unload a model version (requests in progress finish first); operator keys only."""
        key = await _repository_target(endpoint, request, name)
        unloaded = await endpoint.repository.unload(key)
        return {"name": name, "version": str(key[1]), "state": "UNLOADED", "was_loaded": unloaded}


async def _repository_target(endpoint: Endpoint, request: Request, name: str) -> Key:
    caller = await endpoint.access.caller(request.headers.get("authorization"))
    caller.check_role("operator")
    raw = await _body(request, 64 * 1024)
    parameters = oip.parse_header(raw).get("parameters") if raw.strip() else None
    if parameters is not None and not isinstance(parameters, dict):
        raise InputError("'parameters' must be an object")
    version = (parameters or {}).get("version")
    if version is not None and not isinstance(version, (str, int)) or isinstance(version, bool):
        raise InputError("parameters.version must be a string or an integer")
    return await endpoint.repository.resolve(name, None if version is None else str(version))

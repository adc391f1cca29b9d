"""The OpenAI-compatible routes of the cloud endpoint: the GGUF bundles the devices run, answered here too.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or server-sent events) and
``GET /v1/models``, with the device's protocol (:mod:`bundles.openai_compat`: the same request checks,
limits from the bundle, chat template and answers), so an app (or a device falling back) gets the
same answer from either. Flow: caller (device token or API key, as for ``/v2``) -> body under the
limit -> request checked -> the model and version resolved (the device's assigned version, else the
newest) and held loaded for the whole generation (``ModelRepository.use``) -> the first piece
generated in a worker thread before the answer starts (a busy model is a 429, a bad prompt a 400)
-> the rest, whole or streamed. Every answer carries ``edgefleet.source = "cloud"`` with the version
and variant that produced it. Errors on these routes are OpenAI error objects
(:func:`fleet_server.inference.errors.openai_error`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from bundles.errors import InputError
from bundles.openai_compat import (
    ROUTES,
    GenerationError,
    GenerationRequest,
    LlmLimits,
    Started,
    chunk,
    completion_json,
    event,
    figures,
    finish_reason,
    ids,
    start_generation,
    usage,
)

if TYPE_CHECKING:
    from fleet_server.inference.app import Endpoint

MAX_BODY_BYTES = 4 * 2**20
WAIT_FOR_MODEL_S = 10.0
"""How long a request waits for the model's one llama.cpp context before it is answered 429."""


def add_openai_routes(app: FastAPI, endpoint: Endpoint) -> None:
    """Register the routes on the inference app."""

    @app.get("/v1/models", tags=["openai"])
    async def models(request: Request) -> dict[str, Any]:
        """The models this caller may use (OpenAI's list format)."""
        caller = await endpoint.access.caller(request.headers.get("authorization"))
        names = sorted(await asyncio.to_thread(endpoint.catalog.versions))
        allowed = [n for n in names if _allowed(caller, n)]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "edgefleet"} for n in allowed]}

    async def generate(request: Request) -> Response:
        return await _generate(endpoint, request)

    for route in ROUTES:
        app.add_api_route(route, generate, methods=["POST"], tags=["openai"],
                          summary="OpenAI-compatible generation (GGUF bundles)")  # fmt: skip


def _allowed(caller: Any, name: str) -> bool:
    try:
        caller.check_model(name)
    except Exception:
        return False
    return True


async def _generate(endpoint: Endpoint, request: Request) -> Response:
    from fleet_server.inference.app import _body

    caller = await endpoint.access.caller(request.headers.get("authorization"))
    raw = await _body(request, min(endpoint.settings.max_body_bytes, MAX_BODY_BYTES))
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as e:
        raise InputError(f"the request body is not valid JSON: {e}") from e
    generation = GenerationRequest.parse(ROUTES[request.url.path.rstrip("/")], body)
    if generation.model is None:
        raise GenerationError("'model' is required", "model")
    caller.check_model(generation.model)
    key = await endpoint.repository.resolve(generation.model, None, caller.assigned_version(generation.model))
    steps = _steps(endpoint, key, generation)
    started: Started = await steps.__anext__()  # errors before the first piece keep their status
    meta = await steps.__anext__()
    if generation.stream:
        return StreamingResponse(_events(generation, key[0], started, meta, steps), media_type="text/event-stream",
                                 headers={"X-Edgefleet-Source": "cloud"})  # fmt: skip
    text: str = await steps.__anext__()
    answer = completion_json(generation, key[0], text, started.stats, meta)
    return JSONResponse(answer, headers={"X-Edgefleet-Source": "cloud"})


async def _steps(endpoint: Endpoint, key: tuple[str, int], generation: GenerationRequest) -> AsyncIterator[Any]:
    """Holds the model for the whole generation: the started generation, its provenance, then the text
    (whole, or piece by piece when streaming)."""
    async with endpoint.repository.use(key) as entry:
        predictor = getattr(entry.model, "predictor", None)
        runtime = getattr(predictor, "runtime", None)
        if predictor is None:
            raise GenerationError(f"model '{key[0]}' is not a language model (use /v2/models/{key[0]}/infer)", "model")
        limits = LlmLimits.of(predictor.manifest)
        started = await asyncio.to_thread(start_generation, runtime, generation, limits, WAIT_FOR_MODEL_S)
        yield started
        yield {"source": "cloud", "version": key[1], "variant": predictor.variant.id, "fallback_reason": None}
        pieces = started.rest()
        if not generation.stream:
            yield await asyncio.to_thread(lambda: "".join(pieces))
            return
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            yield piece


async def _events(generation: GenerationRequest, model: str, started: Started, meta: dict[str, Any],
                  steps: AsyncIterator[Any]) -> AsyncIterator[bytes]:  # fmt: skip
    ident, created = ids(generation)
    yield event(chunk(generation, ident, created, model, {"role": "assistant", "content": ""}, None, meta))
    try:
        async for piece in steps:
            yield event(chunk(generation, ident, created, model, {"content": piece}, None, meta))
    except Exception as e:  # the answer has begun: the error goes into the stream
        yield event({"error": {"message": str(e), "type": "server_error"}})
        return
    stats = started.stats
    last = chunk(generation, ident, created, model, {}, finish_reason(stats), {**meta, **figures(stats)})
    last["usage"] = usage(stats)
    yield event(last)
    yield b"data: [DONE]\n\n"

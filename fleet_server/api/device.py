"""Device-facing endpoints: enrollment, desired state, inventory and telemetry intake.

A device authenticates with its bearer access token and only ever sees or writes its own rows: the
device id always comes from the token, never from the request. Bodies are the typed contract the
agent also uses (``bundles.contract``): the inventory is parsed into ``Inventory``, the desired
state is checked against ``DesiredState`` when it is rendered, and heartbeat, install and repair
events against their models, so the two ends cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool

from bundles.contract import EVENT_MODELS, Inventory, parse, to_dict
from bundles.errors import ConfigError
from fleet_server.api.bodies import read_capped
from fleet_server.api.deps import AnyDeviceDep, DevicePrincipal, SessionDep, SessionRoute, SettingsDep, bearer_token
from fleet_server.errors import ForbiddenError
from fleet_server.schemas import ChallengeOut, EnrollIn, EnrollOut, TelemetryOut, TufInfo
from fleet_server.services import devices
from fleet_server.services.desired_state import DesiredStateService, etag_matches
from fleet_server.services.telemetry_intake import batch_rows, decompress, parse_batch, store_batch

router = APIRouter(prefix="/api/v1", tags=["device"], route_class=SessionRoute)


async def uploading_device(request: Request) -> DevicePrincipal:
    """The accepted device holding the bearer token, through the desired-state service (answered from
    memory where it keeps answers, ``services.desired_state``): an upload costs no extra round trip."""
    state = await request.app.state.desired_state.for_token(bearer_token(request))
    if state.status != "accepted":
        raise ForbiddenError(f"device {state.device_id} is {state.status}, not accepted")
    return DevicePrincipal(device_id=state.device_id, status=state.status)


UploaderDep = Annotated[DevicePrincipal, Depends(uploading_device)]

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing, unknown or revoked token"},
    403: {"description": "device retired"},
}


@router.post("/enroll/challenge", response_model=ChallengeOut)
def enroll_challenge(session: SessionDep, settings: SettingsDep) -> ChallengeOut:
    """A single-use nonce for the device to sign with its Ed25519 key (rate-limited per client by the guard)."""
    nonce, ttl_s = devices.create_nonce(session, settings.nonce_ttl_s)
    return ChallengeOut(nonce=nonce, expires_in_s=ttl_s)


@router.post("/enroll", response_model=EnrollOut, responses={**AUTH_ERRORS, 429: {"description": "rate limited"}})
def enroll(body: EnrollIn, request: Request, session: SessionDep, settings: SettingsDep) -> EnrollOut:
    """Enroll with a fleet token and proof of key possession; returns the access token (shown once)."""
    result = devices.enroll(session, settings, body.model_dump())
    base = settings.public_url.rstrip("/")
    tuf = TufInfo(root=request.app.state.tuf.trusted_root(), metadata_url=f"{base}/tuf/metadata/",
                  targets_url=f"{base}/tuf/targets/")  # fmt: skip
    status: Literal["pending", "accepted"] = "pending" if result.device.status == "pending" else "accepted"
    return EnrollOut(device_id=result.device.id, status=status, access_token=result.access_token, tuf=tuf)


@router.get(
    "/device/desired-state",
    responses={
        200: {"description": "DesiredState (see docs/api.md)"},
        304: {"description": "unchanged"},
        **AUTH_ERRORS,
    },
)
async def desired_state(
    request: Request, if_none_match: str | None = Header(default=None, max_length=1000)
) -> Response:
    """What this device should run; ``If-None-Match`` with the last ETag gives a body-less 304.

    Well-formed polls are answered by :mod:`fleet_server.api.fast_path` before routing, with the same
    service; this route documents the endpoint and answers the requests the fast path declines.
    """
    service: DesiredStateService = request.app.state.desired_state
    state = await service.for_token(bearer_token(request))
    headers = {"ETag": state.etag, "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, state.etag):
        request.app.state.metrics.polls.labels("not_modified").inc()
        return Response(status_code=304, headers=headers)
    request.app.state.metrics.polls.labels("changed").inc()
    return Response(state.body, media_type="application/json", headers=headers)


@router.put("/device/inventory", status_code=204, responses=AUTH_ERRORS)
def put_inventory(body: Inventory, device: AnyDeviceDep, session: SessionDep) -> Response:
    """Replace this device's reported inventory (capabilities, installed bundles, agent version)."""
    row = devices.get_device(session, device.device_id)
    devices.apply_inventory(row, _without_nulls(to_dict(parse(Inventory, body, "inventory"))))
    devices.touch_last_seen(session, device.device_id)
    return Response(status_code=204)


@router.post(
    "/device/telemetry",
    response_model=TelemetryOut,
    responses={**AUTH_ERRORS, 413: {"description": "body or item count over the limit"}},
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}},
)
async def post_telemetry(
    request: Request, device: UploaderDep, content_encoding: str | None = Header(default=None, max_length=50)
) -> Response:
    """Store a telemetry batch (gzip/zstd allowed); a retried ``batch_id`` is stored once.

    Well-formed uploads are answered by :mod:`fleet_server.api.fast_path` before routing, through
    :func:`store_upload` too; this route documents the endpoint and answers the requests it declines.
    """
    return Response(await store_upload(request, device, content_encoding), media_type="application/json")


async def store_upload(request: Request, device: DevicePrincipal, content_encoding: str | None) -> bytes:
    """Read, check and store one upload of ``device``; the JSON answer (``TelemetryOut``)."""
    settings = request.app.state.settings
    raw = await read_capped(request, settings.max_telemetry_bytes)
    if not raw:
        raise ConfigError("the telemetry body is empty")
    batch = parse_batch(decompress(raw, content_encoding, settings.max_telemetry_bytes), settings.max_telemetry_items)
    _check_typed_events(batch.items.get("events", []))
    committer = request.app.state.telemetry_committer
    if committer is not None:  # PostgreSQL: group commit on the asyncio pool, no thread hop
        rows = batch_rows(batch, device.device_id)
        result = await committer.store(device.device_id, batch.batch_id, rows, len(raw))
    else:
        result = await run_in_threadpool(store_batch, request.app.state.engine, device.device_id, batch, len(raw))
    _count_telemetry(request, result.accepted, result.duplicate)
    return TelemetryOut(accepted=result.accepted, duplicate=result.duplicate).model_dump_json().encode()


def _check_typed_events(events: list[tuple[dict[str, Any], str]]) -> None:
    """Heartbeats, install and repair events must fit their contract models (400 naming the field if not)."""
    for i, (item, _text) in enumerate(events):
        model = EVENT_MODELS.get(str(item.get("type")))
        if model is not None:
            parse(model, item, f"events[{i}]")


def _without_nulls(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_nulls(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_without_nulls(v) for v in data]
    return data


def _count_telemetry(request: Request, accepted: dict[str, int], duplicate: bool) -> None:
    metrics = request.app.state.metrics
    metrics.telemetry_batches.labels("duplicate" if duplicate else "stored").inc()
    if not duplicate:
        for kind, count in accepted.items():
            metrics.telemetry_rows.labels(kind).inc(count)

"""Admin endpoints: API keys, enrollment tokens, devices, groups, saved filters, assignments, audit log.

Reads need ``viewer``; device and fleet changes need ``operator``; API keys, enrollment tokens and
device status changes need ``admin``. Every mutation is audited by the service it calls.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response
from sqlalchemy import select

from fleet_server.api.deps import AdminDep, OperatorDep, SessionDep, SessionRoute, SettingsDep, ViewerDep
from fleet_server.models import AuditEntry
from fleet_server.schemas import (
    MAX_INT32,
    ApiKeyCreated,
    ApiKeyIn,
    ApiKeyOut,
    AssignmentIn,
    AssignmentOut,
    AuditOut,
    DbInt,
    DeviceList,
    DeviceOut,
    EnrollTokenIn,
    EnrollTokenOut,
    FilterIn,
    FilterOut,
    GroupIn,
    GroupOut,
    GroupPatch,
    MembersIn,
    TagsIn,
)
from fleet_server.services import api_keys, devices, enroll_tokens, fleet

router = APIRouter(prefix="/api/v1/admin", tags=["admin"], route_class=SessionRoute)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or revoked API key"}, 403: {"description": "role too weak"},
    404: {"description": "not found"}, 409: {"description": "conflicts with the current state"},
}  # fmt: skip
DeviceIdPath = str
NamePath = str


# --- API keys --------------------------------------------------------------------------------------
@router.post("/api-keys", response_model=ApiKeyCreated, status_code=201, responses=ERRORS)
def create_api_key(body: ApiKeyIn, caller: AdminDep, session: SessionDep, settings: SettingsDep) -> ApiKeyCreated:
    """Create an API key; its secret is in this answer only."""
    key, secret = api_keys.create_api_key(session, name=body.name, role=body.role, actor=caller.actor,
                                          pepper=settings.token_pepper)  # fmt: skip
    return ApiKeyCreated(**api_keys.describe_api_key(key), secret=secret)


@router.get("/api-keys", response_model=list[ApiKeyOut], responses=ERRORS)
def list_api_keys(_caller: AdminDep, session: SessionDep) -> list[ApiKeyOut]:
    """Every API key (without secrets)."""
    return [ApiKeyOut(**api_keys.describe_api_key(k)) for k in api_keys.list_api_keys(session)]


@router.delete("/api-keys/{key_id}", response_model=ApiKeyOut, responses=ERRORS)
def revoke_api_key(key_id: DbInt, caller: AdminDep, session: SessionDep) -> ApiKeyOut:
    """Revoke an API key (it stops working at once)."""
    return ApiKeyOut(**api_keys.describe_api_key(api_keys.revoke_api_key(session, key_id=key_id, actor=caller.actor)))


# --- enrollment tokens -----------------------------------------------------------------------------
@router.post("/enroll-tokens", response_model=EnrollTokenOut, status_code=201, responses=ERRORS)
def create_enroll_token(
    body: EnrollTokenIn, caller: AdminDep, session: SessionDep, settings: SettingsDep
) -> EnrollTokenOut:
    """Create a fleet enrollment token; its secret is in this answer only."""
    token, secret = enroll_tokens.create_enroll_token(
        session, fleet=body.fleet, expires_in_s=body.expires_in_s, max_uses=body.max_uses, actor=caller.actor,
        pepper=settings.token_pepper,
    )  # fmt: skip
    return EnrollTokenOut(**enroll_tokens.describe_token(token), token=secret)


@router.get("/enroll-tokens", response_model=list[EnrollTokenOut], responses=ERRORS)
def list_enroll_tokens(_caller: AdminDep, session: SessionDep) -> list[EnrollTokenOut]:
    """Every enrollment token (without secrets)."""
    return [EnrollTokenOut(**enroll_tokens.describe_token(t)) for t in enroll_tokens.list_enroll_tokens(session)]


@router.delete("/enroll-tokens/{token_id}", response_model=EnrollTokenOut, responses=ERRORS)
def revoke_enroll_token(token_id: DbInt, caller: AdminDep, session: SessionDep) -> EnrollTokenOut:
    """Revoke an enrollment token."""
    token = enroll_tokens.revoke_enroll_token(session, token_id=token_id, actor=caller.actor)
    return EnrollTokenOut(**enroll_tokens.describe_token(token))


# --- devices ---------------------------------------------------------------------------------------
@router.get("/devices", response_model=DeviceList, responses=ERRORS)
def list_devices(
    _caller: ViewerDep,
    session: SessionDep,
    filter: str = Query(default="", max_length=2000, description="e.g. hw=pi4 and runtime=onnxruntime>=1.20"),  # noqa: A002
    saved_filter: str | None = Query(default=None, max_length=100),
    limit: int = Query(default=1000, ge=1, le=10_000),
    offset: int = Query(default=0, ge=0, le=MAX_INT32),
) -> DeviceList:
    """Devices matching a filter expression or a saved filter."""
    expression = fleet.get_filter(session, saved_filter).expression if saved_filter else filter
    rows = fleet.list_devices(session, expression, limit=limit, offset=offset)
    return DeviceList(data=[DeviceOut(**row) for row in rows], count=len(rows))


@router.get("/devices/{device_id}", response_model=DeviceOut, responses=ERRORS)
def show_device(device_id: DeviceIdPath, _caller: ViewerDep, session: SessionDep) -> DeviceOut:
    """One device with its inventory, tags and groups."""
    return DeviceOut(**fleet.device_detail(session, device_id))


def _status_change(action: str, device_id: str, actor: str, session: SessionDep) -> DeviceOut:
    devices.change_status(session, device_id=device_id, action=action, actor=actor)
    return DeviceOut(**fleet.device_detail(session, device_id))


@router.post("/devices/{device_id}/approve", response_model=DeviceOut, responses=ERRORS)
def approve_device(device_id: DeviceIdPath, caller: AdminDep, session: SessionDep) -> DeviceOut:
    """Accept a pending (or rejected) device."""
    return _status_change("approve", device_id, caller.actor, session)


@router.post("/devices/{device_id}/reject", response_model=DeviceOut, responses=ERRORS)
def reject_device(device_id: DeviceIdPath, caller: AdminDep, session: SessionDep) -> DeviceOut:
    """Reject a device and revoke its access token."""
    return _status_change("reject", device_id, caller.actor, session)


@router.post("/devices/{device_id}/decommission", response_model=DeviceOut, responses=ERRORS)
def decommission_device(device_id: DeviceIdPath, caller: AdminDep, session: SessionDep) -> DeviceOut:
    """Retire a device for good and revoke its access token."""
    return _status_change("decommission", device_id, caller.actor, session)


@router.post("/devices/{device_id}/tags", response_model=DeviceOut, responses=ERRORS)
def change_tags(device_id: DeviceIdPath, body: TagsIn, caller: OperatorDep, session: SessionDep) -> DeviceOut:
    """Add and remove tags."""
    devices.set_tags(session, device_id=device_id, add=body.add, remove=body.remove, actor=caller.actor)
    return DeviceOut(**fleet.device_detail(session, device_id))


# --- groups and saved filters ----------------------------------------------------------------------
@router.get("/groups", response_model=list[GroupOut], responses=ERRORS)
def list_groups(_caller: ViewerDep, session: SessionDep) -> list[GroupOut]:
    """Every static group with its member count."""
    return [GroupOut(**fleet.describe_group(session, g)) for g in fleet.list_groups(session)]


@router.post("/groups", response_model=GroupOut, status_code=201, responses=ERRORS)
def create_group(body: GroupIn, caller: OperatorDep, session: SessionDep) -> GroupOut:
    """Create a static group, optionally with a poll interval override for its members."""
    group = fleet.create_group(session, name=body.name, description=body.description,
                               poll_interval_s=body.poll_interval_s, actor=caller.actor)  # fmt: skip
    return GroupOut(**fleet.describe_group(session, group))


@router.patch("/groups/{name}", response_model=GroupOut, responses=ERRORS)
def update_group(name: NamePath, body: GroupPatch, caller: OperatorDep, session: SessionDep) -> GroupOut:
    """Change a group's description or poll interval."""
    group = fleet.update_group(session, name=name, changes=body.model_dump(), actor=caller.actor)
    return GroupOut(**fleet.describe_group(session, group))


@router.delete("/groups/{name}", status_code=204, responses=ERRORS)
def delete_group(name: NamePath, caller: OperatorDep, session: SessionDep) -> Response:
    """Delete a group."""
    fleet.delete_group(session, name=name, actor=caller.actor)
    return Response(status_code=204)


@router.post("/groups/{name}/members", response_model=GroupOut, responses=ERRORS)
def add_members(name: NamePath, body: MembersIn, caller: OperatorDep, session: SessionDep) -> GroupOut:
    """Add devices to a group."""
    group = fleet.change_members(session, name=name, add=body.device_ids, remove=[], actor=caller.actor)
    return GroupOut(**fleet.describe_group(session, group))


@router.delete("/groups/{name}/members/{device_id}", response_model=GroupOut, responses=ERRORS)
def remove_member(name: NamePath, device_id: DeviceIdPath, caller: OperatorDep, session: SessionDep) -> GroupOut:
    """Remove one device from a group."""
    group = fleet.change_members(session, name=name, add=[], remove=[device_id], actor=caller.actor)
    return GroupOut(**fleet.describe_group(session, group))


@router.get("/filters", response_model=list[FilterOut], responses=ERRORS)
def list_filters(_caller: ViewerDep, session: SessionDep) -> list[FilterOut]:
    """Every saved filter."""
    from fleet_server.models import SavedFilter

    rows = session.scalars(select(SavedFilter).order_by(SavedFilter.name))
    return [FilterOut(id=f.id, name=f.name, expression=f.expression) for f in rows]


@router.put("/filters", response_model=FilterOut, responses=ERRORS)
def save_filter(body: FilterIn, caller: OperatorDep, session: SessionDep) -> FilterOut:
    """Save (or replace) a named device filter."""
    saved = fleet.save_filter(session, name=body.name, expression=body.expression, actor=caller.actor)
    return FilterOut(id=saved.id, name=saved.name, expression=saved.expression)


@router.delete("/filters/{name}", status_code=204, responses=ERRORS)
def delete_filter(name: NamePath, caller: OperatorDep, session: SessionDep) -> Response:
    """Delete a saved filter."""
    fleet.delete_filter(session, name=name, actor=caller.actor)
    return Response(status_code=204)


# --- assignments -----------------------------------------------------------------------------------
@router.get("/assignments", response_model=list[AssignmentOut], responses=ERRORS)
def list_assignments(
    _caller: ViewerDep,
    session: SessionDep,
    device_id: str | None = Query(default=None, max_length=40),
    model_name: str | None = Query(default=None, max_length=100),
) -> list[AssignmentOut]:
    """Assignments (what each device should run)."""
    rows = fleet.list_assignments(session, device_id=device_id, model_name=model_name)
    return [AssignmentOut(**fleet.describe_assignment(a)) for a in rows]


@router.put("/assignments", response_model=AssignmentOut, responses=ERRORS)
def set_assignment(body: AssignmentIn, caller: OperatorDep, session: SessionDep) -> AssignmentOut:
    """Pin a device to a published bundle version (outside any rollout)."""
    return AssignmentOut(
        **fleet.describe_assignment(fleet.assign(session, request=body.model_dump(), actor=caller.actor))
    )


@router.delete("/assignments/{device_id}/{model_name}", status_code=204, responses=ERRORS)
def delete_assignment(
    device_id: DeviceIdPath, model_name: NamePath, caller: OperatorDep, session: SessionDep
) -> Response:
    """Remove a device's assignment for a model."""
    fleet.unassign(session, device_id=device_id, model_name=model_name, actor=caller.actor)
    return Response(status_code=204)


# --- audit log -------------------------------------------------------------------------------------
@router.get("/audit", response_model=list[AuditOut], responses=ERRORS)
def audit_log(
    _caller: ViewerDep,
    session: SessionDep,
    limit: int = Query(default=100, ge=1, le=10_000),
    action: str | None = Query(default=None, max_length=64),
) -> list[AuditOut]:
    """The newest audit entries, optionally for one action (``device.approve``)."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if action:
        query = query.where(AuditEntry.action == action)
    return [
        AuditOut(id=e.id, at=e.at.isoformat(), actor=e.actor, action=e.action, target_type=e.target_type,
                 target_id=e.target_id, before=e.before, after=e.after)
        for e in session.scalars(query)
    ]  # fmt: skip

"""Admin HTTP API of the rollout engine (included by ``fleet_server.app`` as ``router``).

Reads need the ``viewer`` role; creating, controlling and pinning need ``operator``. Every mutation
is audited (by :mod:`.service`). The router's lifespan starts the evaluation loop with the app when
background tasks are on (``settings.background_tasks``), every ``settings.rollout_tick_s`` seconds.

| method, path | what |
|---|---|
| ``POST /api/v1/admin/rollouts`` | create (201, the rollout as ``GET`` shows it) |
| ``GET /api/v1/admin/rollouts`` | list (``?state=``, ``?model=``) |
| ``GET /api/v1/admin/rollouts/{id}`` | waves, cohort progress, gate values, decisions (``?devices=true``) |
| ``POST /api/v1/admin/rollouts/{id}/{action}`` | start, approve, pause, resume, abort, rollback |
| ``POST /api/v1/admin/rollouts/{id}/evaluate`` | run one evaluation now instead of waiting for the loop |
| ``POST /api/v1/admin/pins`` / ``POST /api/v1/admin/pins/clear`` | pin devices or groups to a version / lift pins |
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import select

from fleet_server.api.deps import OperatorDep, SessionDep, SessionRoute, ViewerDep
from fleet_server.background import app_task
from fleet_server.durations import parse_duration_s
from fleet_server.rollouts import service
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.rollouts.models import Rollout
from fleet_server.rollouts.spec import DEFAULT_WAVES, RolloutPolicy, parse_bundle_ref, parse_waves
from fleet_server.rollouts.views import describe_rollout, summarise_rollout


def _rollout_loop(app: FastAPI) -> Coroutine[Any, Any, None]:
    """The rollout evaluation loop, ticking every ``settings.rollout_tick_s`` (``EDGEFLEET_ROLLOUT_TICK_S``)."""
    leadership = app.state.leadership
    engine = RolloutEngine(app.state.session_factory, metrics=app.state.metrics, is_leader=lambda: leadership.held)
    app.state.rollout_engine = engine
    return engine.run(app.state.settings.rollout_tick_s)


router = APIRouter(
    prefix="/api/v1/admin", tags=["rollouts"], lifespan=app_task(_rollout_loop), route_class=SessionRoute
)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request"}, 401: {"description": "missing or revoked API key"},
    403: {"description": "role too weak"}, 404: {"description": "not found"},
    409: {"description": "not allowed in the rollout's state, or devices held by another rollout"},
}  # fmt: skip
Action = Literal["start", "approve", "pause", "resume", "abort", "rollback"]
RolloutId = Annotated[int, Path(ge=1, le=2**31 - 1)]
Text = Annotated[str, StringConstraints(max_length=500)]


class RolloutIn(BaseModel):
    """A rollout request; durations as ``30m``/``2h`` strings or seconds."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(max_length=120, description="NAME@VERSION, e.g. digits@3", examples=["digits@3"])
    targets: list[Text] = Field(
        min_length=1, max_length=1000, description="all, group:NAME, filter:NAME, where:EXPR, device:ID"
    )
    waves: Text | list[Text] = Field(default=DEFAULT_WAVES, description="cumulative shares or counts, e.g. 1%,10%,100%")
    gates: list[Text] = Field(default_factory=list, max_length=32, examples=[["error_rate<0.01", "p99_ms<40"]])
    soak: str | float = "30m"
    device_timeout: str | float = "1h"
    on_breach: Literal["rollback", "pause"] = "rollback"
    approval: Literal["none", "start", "each_wave"] = "none"
    max_concurrent_downloads: int | None = Field(default=None, ge=1)
    jitter: str | float = "60s"
    variant_preferences: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=16, examples=[["tflite", "onnx:int8-static"]],
        description="ranked before each device's own preferences when its variant is picked "
        "(targets, precisions, target:precision, variant ids, runtime names)",
    )  # fmt: skip
    draft: bool = False

    def to_request(self) -> service.CreateRequest:
        """The service request, every field parsed (ConfigError -> 400 on bad text)."""
        model, version = parse_bundle_ref(self.bundle)
        policy = RolloutPolicy(
            waves=parse_waves(self.waves), gates=tuple(self.gates), soak_s=parse_duration_s(self.soak),
            device_timeout_s=parse_duration_s(self.device_timeout), on_breach=self.on_breach,
            approval=self.approval, max_concurrent_downloads=self.max_concurrent_downloads,
            jitter_s=parse_duration_s(self.jitter), variant_preferences=tuple(self.variant_preferences),
        )  # fmt: skip
        return service.CreateRequest(model, version, tuple(self.targets), policy, self.draft)


class PinIn(BaseModel):
    """Pin devices to a bundle version."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(max_length=120, description="NAME@VERSION", examples=["digits@2"])
    targets: list[Text] = Field(min_length=1, max_length=1000)


class UnpinIn(BaseModel):
    """Lift pins of a model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=100)
    targets: list[Text] = Field(min_length=1, max_length=1000)


@router.post("/rollouts", status_code=201, responses=ERRORS)
def create_rollout(body: RolloutIn, caller: OperatorDep, session: SessionDep) -> dict[str, Any]:
    """Create a rollout (it starts at once unless it is a draft or needs approval)."""
    rollout = service.create_rollout(session, body.to_request(), caller.actor)
    return describe_rollout(session, rollout)


@router.get("/rollouts", responses=ERRORS)
def list_rollouts(
    _caller: ViewerDep,
    session: SessionDep,
    state: Annotated[str | None, Query(max_length=32)] = None,
    model: Annotated[str | None, Query(max_length=100)] = None,
) -> list[dict[str, Any]]:
    """Rollouts, newest first."""
    query = select(Rollout).order_by(Rollout.id.desc())
    if state:
        query = query.where(Rollout.state == state)
    if model:
        query = query.where(Rollout.model_name == model)
    return [summarise_rollout(r) for r in session.scalars(query)]


@router.get("/rollouts/{rollout_id}", responses=ERRORS)
def show_rollout(
    rollout_id: RolloutId, _caller: ViewerDep, session: SessionDep, devices: bool = False
) -> dict[str, Any]:
    """A rollout with its waves, cohort progress, gate values and decision records."""
    return describe_rollout(session, service.get_rollout(session, rollout_id), with_devices=devices)


@router.post("/rollouts/{rollout_id}/evaluate", responses=ERRORS)
def evaluate_now(rollout_id: RolloutId, request: Request, _caller: OperatorDep, session: SessionDep) -> dict[str, Any]:
    """Run one evaluation of this rollout now (the loop would do the same on its next tick)."""
    service.get_rollout(session, rollout_id)
    session.commit()  # end this read so the evaluation's writes are visible afterwards (SQLite snapshots)
    RolloutEngine(request.app.state.session_factory, metrics=request.app.state.metrics).tick_one(rollout_id)
    session.expire_all()
    return describe_rollout(session, service.get_rollout(session, rollout_id))


@router.post("/rollouts/{rollout_id}/{action}", responses=ERRORS)
def control_rollout(rollout_id: RolloutId, action: Action, caller: OperatorDep, session: SessionDep) -> dict[str, Any]:
    """Approve, pause, resume, abort or roll back a rollout (409 when its state does not allow it)."""
    rollout = service.act(session, rollout_id, action, caller.actor)
    return describe_rollout(session, rollout)


@router.post("/pins", responses=ERRORS)
def pin_devices(body: PinIn, caller: OperatorDep, session: SessionDep) -> dict[str, Any]:
    """Pin devices (or groups, filters) to a version; devices that cannot run it are listed, not pinned."""
    model, version = parse_bundle_ref(body.bundle)
    return service.pin(session, model, version, body.targets, caller.actor)


@router.post("/pins/clear", responses=ERRORS)
def unpin_devices(body: UnpinIn, caller: OperatorDep, session: SessionDep) -> dict[str, Any]:
    """Lift pins of a model on these devices."""
    return service.unpin(session, body.model, body.targets, caller.actor)

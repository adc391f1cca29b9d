"""Admin HTTP API of telemetry and drift (included by the app factory as ``router``).

Read endpoints need the viewer role, changes the operator role, pruning the admin role. Times are
ISO 8601; ``since`` defaults to one hour ago. Shapes: ``docs/telemetry.md``. The router's lifespan
runs the maintenance loop (``tasks``: drift evaluation every 5 minutes, retention daily).

| method, path | what |
|---|---|
| ``GET /api/v1/admin/telemetry/summary?model=&by=version|device|variant|fleet&since=&until=`` | aggregates |
| ``GET /api/v1/admin/telemetry/cohort?model=&version=&device_id=...&since=`` | rollout-gate numbers |
| ``GET /api/v1/admin/telemetry/samples?model=&version=&device_id=&reason=&since=&until=&limit=`` | sampled logs |
| ``GET /api/v1/admin/telemetry/samples.parquet?...`` | the same as a Parquet file |
| ``POST /api/v1/admin/telemetry/prune`` | apply the retention limits |
| ``GET /api/v1/admin/drift/{model}?since=&until=`` | PSI per feature and output, per version |
| ``GET/PUT /api/v1/admin/drift/{model}/monitor`` | the model's thresholds (defaults 0.1 / 0.25) |
| ``POST /api/v1/admin/drift/{model}/evaluate`` | evaluate the monitor now (opens/resolves alerts) |
| ``GET /api/v1/admin/drift-alerts?model=&all=`` | alerts, open ones by default |
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Response
from pydantic import BaseModel, BeforeValidator, Field, StrictBool

from bundles.errors import ConfigError
from fleet_server.api.deps import AdminDep, OperatorDep, SessionDep, SessionRoute, ViewerDep
from fleet_server.background import app_task
from fleet_server.telemetry import monitors, query
from fleet_server.telemetry.tasks import Maintenance


def _maintenance_loop(app: FastAPI) -> Coroutine[Any, Any, None]:
    """The telemetry maintenance loop: drift evaluation and retention."""
    leadership = app.state.leadership
    return Maintenance(app.state.session_factory, is_leader=lambda: leadership.held).run()


router = APIRouter(
    prefix="/api/v1/admin", tags=["telemetry"], lifespan=app_task(_maintenance_loop), route_class=SessionRoute
)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid parameter"}, 401: {"description": "missing or revoked API key"},
    403: {"description": "role too weak"},
}  # fmt: skip
MAX_SAMPLES = 10_000
MAX_LOOKBACK_S = 90 * 86_400  # a drift monitor's evaluation period, through the API or the CLI
ModelName = Annotated[str, Query(min_length=1, max_length=100)]
ModelPath = Annotated[str, Path(min_length=1, max_length=100)]
Since = Annotated[dt.datetime | None, Query(description="ISO 8601; default one hour ago")]
Until = Annotated[dt.datetime | None, Query(description="ISO 8601; default now")]
OptModel = Annotated[str | None, Query(max_length=100)]
OptVersion = Annotated[int | None, Query(ge=0, lt=2**31)]
OptDevice = Annotated[str | None, Query(max_length=40)]
OptReason = Annotated[str | None, Query(max_length=32)]
PARQUET: dict[int | str, dict[str, Any]] = {200: {"content": {"application/vnd.apache.parquet": {}}}}


def _json_number(value: Any) -> Any:
    """A JSON number as sent: ``"30"`` or ``true`` is not one (pydantic's lax mode would convert them)."""
    if isinstance(value, (str, bool)):
        raise ValueError("expected a number")
    return value


NUMBER = BeforeValidator(_json_number)


class MonitorIn(BaseModel):
    """A per-model override of the drift monitor (unset fields keep their value)."""

    warn_psi: Annotated[float, Field(gt=0, le=10), NUMBER] | None = None
    alert_psi: Annotated[float, Field(gt=0, le=10), NUMBER] | None = None
    lookback_s: Annotated[int, Field(gt=0, le=MAX_LOOKBACK_S), NUMBER] | None = None
    min_rows: Annotated[int, Field(ge=0, le=10**9), NUMBER] | None = None
    enabled: StrictBool | None = None


class PruneIn(BaseModel):
    """Retention limits in days."""

    windows_days: Annotated[int, Field(ge=1, le=3650), NUMBER] = 90
    samples_days: Annotated[int, Field(ge=1, le=3650), NUMBER] = 30
    events_days: Annotated[int, Field(ge=1, le=3650), NUMBER] = 365


def _period(since: dt.datetime | None, until: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    until = _aware(until) if until is not None else now
    since = _aware(since) if since is not None else until - dt.timedelta(hours=1)
    if since >= until:
        raise ConfigError("since must be before until")
    return since, until


EARLIEST, LATEST = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2200, 1, 1, tzinfo=dt.timezone.utc)


def _aware(value: dt.datetime) -> dt.datetime:
    """A query time in UTC, refused (400) outside 2000 to 2200 (where date arithmetic cannot overflow)."""
    try:
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)
        aware = aware.astimezone(dt.timezone.utc)
    except OverflowError:
        aware = EARLIEST - dt.timedelta(days=1)
    if not EARLIEST <= aware < LATEST:
        raise ConfigError(f"time {value.isoformat()[:40]} is outside {EARLIEST.year} to {LATEST.year}")
    return aware


@router.get("/telemetry/summary", responses=ERRORS)
def summary(
    session: SessionDep, _caller: ViewerDep, model: ModelName, since: Since = None, until: Until = None,
    by: Annotated[str, Query(pattern="^(version|device|fleet|variant)$")] = "version",
) -> list[dict[str, Any]]:  # fmt: skip
    """Requests, errors, fallbacks, latency percentiles and PSI per version, per device or fleet-wide."""
    start, end = _period(since, until)
    return query.summarize(session, model, start, end, by)


@router.get("/telemetry/cohort", responses=ERRORS)
def cohort(
    session: SessionDep, _caller: ViewerDep, model: ModelName, version: Annotated[int, Query(ge=0, lt=2**31)],
    device_id: Annotated[list[str], Query(max_length=10_000)], since: Since = None,
) -> dict[str, Any]:  # fmt: skip
    """The numbers a rollout gate reads, for one version on the given devices."""
    start, _ = _period(since, None)
    return query.cohort_stats(session, model, version, device_id, start).to_dict()


def _filter(
    model: str | None, version: int | None, device_id: str | None, reason: str | None,
    since: dt.datetime | None, until: dt.datetime | None,
) -> query.SampleFilter:  # fmt: skip
    start = None if since is None else _aware(since)
    end = None if until is None else _aware(until)
    return query.SampleFilter(model, version, device_id, reason, start, end)


@router.get("/telemetry/samples", responses=ERRORS)
def list_samples(
    session: SessionDep, _caller: ViewerDep,
    model: OptModel = None, version: OptVersion = None, device_id: OptDevice = None, reason: OptReason = None,
    since: Since = None, until: Until = None, limit: Annotated[int, Query(ge=1, le=MAX_SAMPLES)] = 100,
) -> list[dict[str, Any]]:  # fmt: skip
    """Sampled prediction logs, newest first, filtered by device, version, reason and time."""
    rows = query.samples(session, _filter(model, version, device_id, reason, since, until), limit)
    return [query.sample_dict(r) for r in rows]


@router.get("/telemetry/samples.parquet", responses={**ERRORS, **PARQUET})
def export_samples(
    session: SessionDep, _caller: ViewerDep,
    model: OptModel = None, version: OptVersion = None, device_id: OptDevice = None, reason: OptReason = None,
    since: Since = None, until: Until = None, limit: Annotated[int, Query(ge=1, le=1_000_000)] = 100_000,
) -> Response:  # fmt: skip
    """The same samples as a Parquet file (one row per sample, tensors as JSON, with inclusion probability)."""
    rows = query.samples(session, _filter(model, version, device_id, reason, since, until), limit)
    out = io.BytesIO()
    query.samples_to_parquet(rows, out)
    headers = {"Content-Disposition": 'attachment; filename="samples.parquet"'}
    return Response(out.getvalue(), media_type="application/vnd.apache.parquet", headers=headers)


@router.post("/telemetry/prune", responses=ERRORS)
def prune(session: SessionDep, _caller: AdminDep, body: PruneIn | None = None) -> dict[str, int]:
    """Delete raw telemetry older than the retention limits; rows deleted per table."""
    limits = body or PruneIn()
    return query.prune(session, query.Retention(limits.windows_days, limits.samples_days, limits.events_days))


@router.get("/drift/{model}", responses=ERRORS)
def drift(
    session: SessionDep, _caller: ViewerDep, model: ModelPath, since: Since = None, until: Until = None
) -> dict[str, Any]:
    """PSI per feature and for the output, per version, with the monitor's levels."""
    start, end = _period(since, until)
    settings = monitors.monitor_settings(session, model)
    versions = monitors.drift_by_version(session, model, start, end, settings)
    return {"monitor": settings.to_dict(), "versions": [v.to_dict() for v in versions]}


@router.get("/drift/{model}/monitor", responses=ERRORS)
def get_monitor(session: SessionDep, _caller: ViewerDep, model: ModelPath) -> dict[str, Any]:
    """The thresholds ``model`` is monitored with (``overridden`` false means the defaults)."""
    return monitors.monitor_settings(session, model).to_dict()


@router.put("/drift/{model}/monitor", responses=ERRORS)
def put_monitor(session: SessionDep, _caller: OperatorDep, model: ModelPath, body: MonitorIn) -> dict[str, Any]:
    """Override the drift thresholds of ``model``."""
    if len(model) > 100:
        raise ConfigError("model: at most 100 characters")
    settings = monitors.set_monitor(session, model, body.warn_psi, body.alert_psi, body.lookback_s, body.min_rows,
                                    body.enabled)  # fmt: skip
    return settings.to_dict()


@router.post("/drift/{model}/evaluate", responses=ERRORS)
def evaluate(session: SessionDep, _caller: OperatorDep, model: ModelPath) -> list[dict[str, Any]]:
    """Evaluate the monitor of ``model`` now; the open alerts afterwards."""
    return [monitors.alert_dict(a) for a in monitors.evaluate(session, model)]


@router.get("/drift-alerts", responses=ERRORS)
def alerts(
    session: SessionDep, _caller: ViewerDep, model: OptModel = None,
    include_resolved: Annotated[bool, Query(alias="all")] = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Drift alerts, newest first (open ones unless ``all=true``)."""
    return [monitors.alert_dict(a) for a in monitors.list_alerts(session, model, open_only=not include_resolved)]

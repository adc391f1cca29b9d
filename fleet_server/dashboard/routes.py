"""The dashboard's pages and actions (one router, mounted under ``/ui`` by :func:`create_dashboard`).

| method, path | what | who |
|---|---|---|
| ``GET /login``, ``POST /login``, ``POST /logout`` | log in with an admin API key; log out | anyone |
| ``GET /`` | fleet overview and device list (``?filter=``) | viewer |
| ``GET /devices/{id}`` | one device | viewer |
| ``GET /bundles``, ``GET /bundles/{name}/{version}`` | the registry; one version's variants and plots | viewer |
| ``GET /bundles/{name}/{version}/plots/{kind}.png`` | a converter's plot (``report``, ``agreement``) | viewer |
| ``GET /rollouts``, ``GET /rollouts/{id}`` | rollouts; one rollout | viewer |
| ``POST /rollouts/{id}/{action}`` | start, approve, pause, resume, abort, rollback | operator |
| ``GET /drift``, ``GET /drift/{model}`` | PSI per feature over time (``?hours=``) | viewer |

Actions call :func:`fleet_server.rollouts.service.act`, the function the admin API's
``POST /api/v1/admin/rollouts/{id}/{action}`` calls, with the same actor (``key:<id>:<name>``), so
the decision records and the audit log do not depend on which door an operator used.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session, sessionmaker

from bundles.errors import AuthError
from fleet_server.dashboard import bundles, devices, drift, overview, rollouts
from fleet_server.dashboard.sessions import anonymous_session
from fleet_server.dashboard.web import (
    AnyPage,
    OperatorForm,
    ViewerPage,
    base_path,
    check_csrf,
    codec_of,
    form_fields,
    redirect,
    render,
    safe_next,
    set_session_cookie,
)
from fleet_server.db import session_scope, utcnow
from fleet_server.models import ApiKey
from fleet_server.ratelimit import RateLimiter
from fleet_server.rollouts import service
from fleet_server.schemas import DbInt
from fleet_server.services import plots
from fleet_server.services.api_keys import authenticate_api_key

router = APIRouter()
Action = Literal["start", "approve", "pause", "resume", "abort", "rollback"]
Fields = Annotated[dict[str, str], Depends(form_fields)]
MAX_FILTER_CHARS = 500
FilterText = Annotated[str, Query(max_length=MAX_FILTER_CHARS)]
Hours = Annotated[int, Query(ge=1, le=24 * 90)]
PlotKind = Literal["report", "agreement"]


def _factory(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


# --- login -----------------------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, ctx: AnyPage, next: str | None = None) -> Response:  # noqa: A002
    """The login form (it also gives a first-time visitor the anonymous session its CSRF token needs)."""
    return render(request, ctx, "login.html", next=safe_next(request, next), error=None)


@router.post("/login")
def login(request: Request, ctx: AnyPage, fields: Fields) -> Response:
    """Check the API key; on success a new session id bound to the key (never the one sent in)."""
    check_csrf(request, ctx, fields)
    target = safe_next(request, base_path(request) + fields.get("next", "/"))
    limiter: RateLimiter = request.app.state.login_limiter
    client = request.client.host if request.client else "unknown"
    if limiter.exhausted(client):  # checked before the key, so a correct guess gains nothing either
        error = f"too many failed logins from {client}; retry in a minute"
        return render(request, ctx, "login.html", status=429, next=target, error=error)
    try:
        principal = authenticate_api_key(_factory(request), request.app.state.settings, fields.get("api_key", ""))
    except AuthError as error:
        limiter.spend(client)
        return render(request, ctx, "login.html", status=401, next=target, error=str(error))
    with _factory(request)() as session:
        key = session.get(ApiKey, principal.key_id)
        assert key is not None
        web = codec_of(request).logged_in_session(key)
    response = redirect(request, target)
    set_session_cookie(request, response, web)
    return response


@router.post("/logout")
def logout(request: Request, ctx: AnyPage, fields: Fields) -> Response:
    """End the session in this browser: the cookie is replaced by a new anonymous one."""
    check_csrf(request, ctx, fields)
    response = redirect(request, "/login")
    set_session_cookie(request, response, anonymous_session())
    return response


# --- pages -----------------------------------------------------------------------------------------


@router.get("/")
def fleet(
    request: Request, ctx: ViewerPage, filter: Annotated[str, Query(max_length=MAX_FILTER_CHARS)] = ""
) -> Response:  # noqa: A002
    """Fleet overview: counts by state, version, variant, hardware class, last contact; the device list."""
    with session_scope(_factory(request)) as session:
        data = overview.fleet_overview(session, filter.strip(), utcnow())
    return render(request, ctx, "overview.html", page="fleet", view=data)


@router.get("/devices/{device_id}")
def device(request: Request, ctx: ViewerPage, device_id: str) -> Response:
    """One device: inventory, assignments, installs, health, samples, rollouts."""
    with session_scope(_factory(request)) as session:
        data = devices.device_page(session, device_id, utcnow())
    return render(request, ctx, "device.html", page="fleet", view=data)


@router.get("/bundles")
def bundle_list(request: Request, ctx: ViewerPage) -> Response:
    """Every published bundle version."""
    with session_scope(_factory(request)) as session:
        rows = bundles.bundle_rows(session)
    return render(request, ctx, "bundles.html", page="bundles", rows=rows)


@router.get("/bundles/{name}/{version}")
def bundle(request: Request, ctx: ViewerPage, name: str, version: int) -> Response:
    """One bundle version: variants with their gate results."""
    with session_scope(_factory(request)) as session:
        data = bundles.bundle_page(session, name, version)
    return render(request, ctx, "bundle.html", page="bundles", view=data)


@router.get("/bundles/{name}/{version}/plots/{kind}.png")
def bundle_plot(_ctx: ViewerPage, request: Request, name: str, version: DbInt, kind: PlotKind) -> Response:
    """One of the converter's plots of a version (PNG)."""
    with session_scope(_factory(request)) as session:
        png = plots.get_plot(session, name=name, version=version, kind=kind).png
    return Response(png, media_type="image/png", headers={"cache-control": "private, no-cache"})


@router.get("/rollouts")
def rollout_list(request: Request, ctx: ViewerPage) -> Response:
    """Every rollout, newest first."""
    with session_scope(_factory(request)) as session:
        rows = rollouts.rollout_rows(session)
    return render(request, ctx, "rollouts.html", page="rollouts", rows=rows)


@router.get("/rollouts/{rollout_id}")
def rollout(request: Request, ctx: ViewerPage, rollout_id: int, done: Action | None = None) -> Response:
    """One rollout: waves, progress, gates over time, decisions; the actions its state allows."""
    with session_scope(_factory(request)) as session:
        data = rollouts.rollout_page(session, rollout_id, utcnow())
    return render(request, ctx, "rollout.html", page="rollouts", view=data, done=done)


@router.post("/rollouts/{rollout_id}/{action}")
def rollout_action(request: Request, ctx: OperatorForm, rollout_id: int, action: Action) -> Response:
    """Carry out an operator action through the rollout service (409 page when the state refuses it)."""
    assert ctx.principal is not None
    with session_scope(_factory(request)) as session:
        service.act(session, rollout_id, action, ctx.principal.actor)
    return redirect(request, f"/rollouts/{rollout_id}?done={action}", ctx)


@router.get("/drift")
def drift_index(request: Request, ctx: ViewerPage) -> Response:
    """Models to look at."""
    with session_scope(_factory(request)) as session:
        models = drift.drift_models(session)
    return render(request, ctx, "drift_index.html", page="drift", models=models)


@router.get("/drift/{model}")
def drift_model(
    request: Request, ctx: ViewerPage, model: str, hours: Annotated[int, Query(ge=1, le=24 * 90)] = 24
) -> Response:
    """PSI per feature and output over the last ``hours``."""
    with session_scope(_factory(request)) as session:
        data = drift.drift_page(session, model, hours, utcnow())
    return render(request, ctx, "drift.html", page="drift", view=data, periods=drift.PERIODS_H)

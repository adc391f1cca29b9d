"""The plumbing every dashboard page shares: who is calling, CSRF checks, rendering, redirects, headers.

:func:`page_context` reads the session cookie and the key behind it for each request;
:func:`viewer_page` and :func:`operator_form` are the FastAPI dependencies pages and actions declare.
An operator action passes three checks before anything runs, all on the server: a logged-in,
unrevoked key; the session's CSRF token in the form (and a same-origin ``Origin`` /
``Sec-Fetch-Site`` when the browser sends them); and the ``operator`` role read from the key row now.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from bundles.errors import AuthError
from fleet_server.api.deps import ROLE_RANK
from fleet_server.dashboard.charts import number
from fleet_server.dashboard.devices import tensor_text
from fleet_server.dashboard.sessions import COOKIE_NAME, SESSION_MAX_AGE_S, SessionCodec, WebSession, anonymous_session
from fleet_server.errors import ForbiddenError
from fleet_server.principals import AdminPrincipal

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
CSRF_FIELD = "csrf_token"
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}


class LoginRequiredError(AuthError):
    """No logged-in key behind this request: pages redirect to the login form, actions get a 401."""


class CsrfError(ForbiddenError):
    """A mutating request without this session's CSRF token, or from another site (403)."""


@dataclass
class PageContext:
    """Who is calling and the session to (re)issue with the response."""

    web: WebSession
    principal: AdminPrincipal | None
    csrf: str
    fresh: bool

    @property
    def can_operate(self) -> bool:
        """Whether the key may act (operator or admin): the page shows the buttons only then."""
        return self.principal is not None and ROLE_RANK[self.principal.role] >= ROLE_RANK["operator"]


def codec_of(request: Request) -> SessionCodec:
    codec: SessionCodec = request.app.state.codec
    return codec


def page_context(request: Request) -> PageContext:
    """The caller's session (a new anonymous one if the cookie is absent, forged, expired or revoked)."""
    codec = codec_of(request)
    web = codec.loads(request.cookies.get(COOKIE_NAME))
    principal = codec.principal(request.app.state.session_factory, web)
    fresh = web is None or (web.logged_in and principal is None)
    if web is None or fresh:
        web = anonymous_session()
    return PageContext(web, principal, codec.csrf_token(web), fresh)


def viewer_page(request: Request) -> PageContext:
    """A page's caller: any logged-in key (viewer, operator, admin)."""
    ctx = page_context(request)
    if ctx.principal is None:
        raise LoginRequiredError("log in with an admin API key to see the dashboard")
    return ctx


async def form_fields(request: Request) -> dict[str, str]:
    """The posted form's text fields (read once; Starlette caches the parsed form)."""
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def check_csrf(request: Request, ctx: PageContext, fields: dict[str, str]) -> None:
    """Refuse a cross-site or token-less form post (:class:`CsrfError`)."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise CsrfError("refused: this form was posted from another site")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc not in own_hosts(request):
        raise CsrfError("refused: this form was posted from another origin")
    if ctx.fresh or not codec_of(request).csrf_matches(ctx.web, fields.get(CSRF_FIELD, "")):
        raise CsrfError("refused: the form's CSRF token is missing or stale; reload the page and try again")


def own_hosts(request: Request) -> set[str]:
    """The hosts this server answers as: the request's ``Host`` and the one of ``EDGEFLEET_PUBLIC_URL``
    (a reverse proxy that rewrites ``Host`` still passes the browser's ``Origin``)."""
    return {request.headers.get("host", ""), urlsplit(request.app.state.settings.public_url).netloc}


def operator_form(request: Request, fields: Annotated[dict[str, str], Depends(form_fields)]) -> PageContext:
    """An operator action's caller: logged in, the form's CSRF token checked, then the role."""
    ctx = page_context(request)
    if ctx.principal is None:
        raise LoginRequiredError("log in with an operator API key first")
    check_csrf(request, ctx, fields)
    if not ctx.can_operate:
        role = ctx.principal.role
        raise ForbiddenError(f"API key '{ctx.principal.name}' has role {role}; this action needs operator")
    return ctx


ViewerPage = Annotated[PageContext, Depends(viewer_page)]
OperatorForm = Annotated[PageContext, Depends(operator_form)]
AnyPage = Annotated[PageContext, Depends(page_context)]


def base_path(request: Request) -> str:
    """Where the dashboard is mounted (``/ui``), for links."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def set_session_cookie(request: Request, response: Response, web: WebSession) -> None:
    """Write the session cookie: HttpOnly, SameSite=Strict, Secure behind https, scoped to the dashboard."""
    response.set_cookie(
        COOKIE_NAME, codec_of(request).dumps(web), max_age=SESSION_MAX_AGE_S, path=base_path(request) + "/",
        secure=request.app.state.secure_cookies, httponly=True, samesite="strict",
    )  # fmt: skip


def render(request: Request, ctx: PageContext, template: str, status: int = 200, **data: Any) -> Response:
    """A page from ``template`` with the shared context; re-issues the session cookie when it is new."""
    context = {"base": base_path(request), "ctx": ctx, "csrf_field": CSRF_FIELD, **data}
    response = TEMPLATES.TemplateResponse(request, template, context, status_code=status)
    response.headers["cache-control"] = "no-store"
    if ctx.fresh:
        set_session_cookie(request, response, ctx.web)
    return response


def redirect(request: Request, path: str, ctx: PageContext | None = None) -> Response:
    """A 303 to ``path`` under the dashboard (after a form post: the browser then GETs it)."""
    response = RedirectResponse(base_path(request) + path, status_code=303)
    if ctx is not None and ctx.fresh:
        set_session_cookie(request, response, ctx.web)
    return response


def safe_next(request: Request, target: str | None) -> str:
    """A post-login destination inside the dashboard (anything else, e.g. another site, goes home)."""
    base = base_path(request)
    if target and target.startswith(base + "/") and "//" not in target and "\\" not in target:
        return target[len(base) :]
    return "/"


def _moment(value: Any) -> dt.datetime | str | None:
    """A datetime (UTC) from a datetime or ISO string; text that is no time comes back as text."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if not isinstance(value, dt.datetime):
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value  # stored times are UTC


def _when(value: Any) -> str:
    moment = _moment(value)
    if not isinstance(moment, dt.datetime):
        return "-" if moment is None else moment
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: Any) -> str:
    moment = _moment(value)
    if not isinstance(moment, dt.datetime):
        return "never" if moment is None else moment
    seconds = (dt.datetime.now(dt.timezone.utc) - moment).total_seconds()
    for limit, unit, name in ((120, 1, "s"), (7200, 60, "min"), (172_800, 3600, "h")):
        if seconds < limit:
            return f"{seconds / unit:.0f} {name} ago"
    return f"{seconds / 86_400:.0f} d ago"


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


TEMPLATES.env.filters.update(when=_when, ago=_ago, number=number, json_text=_json_text, compact=tensor_text)

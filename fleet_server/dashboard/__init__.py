"""The fleet dashboard: server-rendered pages over the fleet server's own services (user docs:
``docs/dashboard.md``).

:func:`create_dashboard` builds a small FastAPI app that ``fleet_server.app`` mounts at ``/ui``. It
shares the parent's settings and database sessions and reads everything through the same service
and query functions as the admin API and the CLI (fleet listing, registry, rollout views, telemetry
queries, drift monitors), so the pages show what ``rollout show`` or ``drift`` would. Pages are Jinja2
templates with inline SVG charts and one small script (confirmations, auto-refresh); nothing is
built or fetched from elsewhere.

Being its own app gives the dashboard its own error pages (HTML, not the API's JSON), security
headers (a strict Content-Security-Policy), and keeps its routes out of the API's OpenAPI schema.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import RequestResponseEndpoint

from bundles.errors import EdgeFleetError
from fleet_server.dashboard.routes import router
from fleet_server.dashboard.sessions import SessionCodec
from fleet_server.dashboard.web import SECURITY_HEADERS, LoginRequiredError, page_context, redirect, render
from fleet_server.errors import describe_validation_error, status_for
from fleet_server.ratelimit import RateLimiter

log = logging.getLogger("fleet_server.dashboard")
MOUNT_PATH = "/ui"
STATIC_DIR = Path(__file__).parent / "static"


def create_dashboard(parent: FastAPI) -> FastAPI:
    """The dashboard app for ``parent`` (mount it at :data:`MOUNT_PATH`)."""
    settings = parent.state.settings
    ui = FastAPI(title="edgefleet dashboard", openapi_url=None, docs_url=None, redoc_url=None)
    ui.state.settings = settings
    ui.state.session_factory = parent.state.session_factory
    ui.state.codec = SessionCodec(settings.token_pepper)
    ui.state.secure_cookies = settings.public_url.startswith("https://")
    ui.state.login_limiter = RateLimiter(settings.login_failures_per_minute)
    ui.include_router(router)
    ui.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    ui.add_exception_handler(LoginRequiredError, _login_required)
    ui.add_exception_handler(EdgeFleetError, _domain_error)
    ui.add_exception_handler(RequestValidationError, _validation_error)
    ui.add_exception_handler(StarletteHTTPException, _http_error)
    ui.middleware("http")(_security_headers)
    return ui


def mount_dashboard(app: FastAPI) -> None:
    """Mount the dashboard on ``app`` at :data:`MOUNT_PATH`."""
    app.mount(MOUNT_PATH, create_dashboard(app))


async def _security_headers(request: Request, call_next: RequestResponseEndpoint) -> Response:
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _error_page(request: Request, status: int, message: str) -> Response:
    return render(request, page_context(request), "error.html", status=status, status_code=status, message=message)


def _login_required(request: Request, error: Exception) -> Response:
    if request.method in ("GET", "HEAD"):
        return redirect(request, f"/login?next={quote(request.url.path)}")
    return _error_page(request, 401, str(error))


def _domain_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, EdgeFleetError)
    status = status_for(error)
    if status >= 500:
        log.error("dashboard error: %s", error, exc_info=error)
    return _error_page(request, status, str(error))


def _validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return _error_page(request, 400, describe_validation_error(list(error.errors())))


def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    message = "no such page" if error.status_code == 404 else str(error.detail)
    return _error_page(request, error.status_code, message)

"""The FastAPI app factory.

``create_app(settings)`` wires one app: the database engine and session factory (the schema must
already be migrated: ``edgefleet-server init`` and ``run`` do it, tests do it once per session), the
routers of ``fleet_server.api``, ``fleet_server.telemetry.api`` and ``fleet_server.rollouts.api``, the
domain-error mapping, the request metrics middleware, the dashboard (``fleet_server.dashboard``, at
``/ui``) and the background task that keeps TUF timestamp/snapshot fresh.

Background loops (TUF refresh here; rollout ticks and telemetry maintenance in their routers) run
only in the one process that holds the background leadership (:class:`fleet_server.locks.Leadership`,
re-checked every ``leader_check_s``), however many workers or hosts serve the database. The
last-seen flush is per process (it writes what this process buffered).

Everything request handlers need hangs off ``app.state``: ``settings``, ``engine``,
``session_factory``, ``metrics``, ``desired_state`` (the memoised desired-state renderer),
``telemetry_committer`` (PostgreSQL: telemetry group commit, ``services.telemetry_group_commit``; else None),
``enroll_limiter``, ``tuf`` (the hosted repository) and ``leadership``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from fleet_server import __version__
from fleet_server.api import ROUTERS
from fleet_server.api.fast_path import DesiredStateFastPath, TelemetryFastPath
from fleet_server.api.guard import RequestGuard
from fleet_server.api.openapi import publish as publish_schema
from fleet_server.dashboard import mount_dashboard
from fleet_server.db import make_engine, make_session_factory
from fleet_server.errors import install_error_handlers
from fleet_server.locks import Leadership
from fleet_server.logs import configure_logging
from fleet_server.observability import Metrics, MetricsMiddleware, forget_this_process
from fleet_server.ratelimit import RateLimiter
from fleet_server.rollouts import api as rollouts_api
from fleet_server.services.desired_state import DesiredStateService, listen_for_changes
from fleet_server.services.telemetry_group_commit import GroupCommitter
from fleet_server.services.tuf_host import TufHost, refresh_loop
from fleet_server.settings import Settings
from fleet_server.telemetry import api as telemetry_api

log = logging.getLogger("fleet_server.app")

LAST_SEEN_FLUSH_INTERVAL_S = 5.0


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the fleet-server app for ``settings`` (default: read from the environment)."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.json_logs)
    app = FastAPI(
        title="edgefleet fleet server",
        version=__version__,
        description="Device enrollment, bundle registry, TUF hosting, desired state and telemetry intake.",
        lifespan=_lifespan,
    )
    _attach_state(app, settings)
    install_error_handlers(app)
    _document_errors(app)
    for router in (*ROUTERS, telemetry_api.router, rollouts_api.router):
        app.include_router(router)
    mount_dashboard(app)
    app.add_middleware(TelemetryFastPath)  # behind the guard: its limits apply to uploads
    app.add_middleware(RequestGuard, settings=settings)
    app.add_middleware(DesiredStateFastPath, service=app.state.desired_state, metrics=app.state.metrics)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: times the fast path too
    return app


def _document_errors(app: FastAPI) -> None:
    """Publish the schema as the server enforces it: error statuses and bodies, bounds (``api.openapi``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if not getattr(app.state, "errors_documented", False):
            app.openapi_schema = publish_schema(generate())
            app.state.errors_documented = True
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


def _attach_state(app: FastAPI, settings: Settings) -> None:
    engine = make_engine(settings.resolved_database_url, sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.metrics = Metrics()
    app.state.desired_state = DesiredStateService(engine, settings)
    pool = app.state.desired_state.async_pool
    app.state.telemetry_committer = GroupCommitter(pool) if pool is not None else None
    app.state.enroll_limiter = RateLimiter(settings.enroll_rate_per_minute)
    app.state.tuf = TufHost(settings)
    app.state.leadership = Leadership(engine)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the background tasks (leadership, TUF refresh, last-seen flush); stop them and flush on shutdown."""
    tasks = []
    settings, leadership = app.state.settings, app.state.leadership
    if settings.background_tasks:
        await asyncio.to_thread(_refresh_leadership, app)
        tasks.append(asyncio.create_task(_leadership_loop(app, settings.leader_check_s)))
        tasks.append(asyncio.create_task(refresh_loop(app.state.tuf, settings.tuf_refresh_interval_s,
                                                      lambda: leadership.held)))  # fmt: skip
        tasks.append(asyncio.create_task(_flush_loop(app.state.desired_state, LAST_SEEN_FLUSH_INTERVAL_S)))
        tasks.append(asyncio.create_task(listen_for_changes(app.state.desired_state)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.to_thread(_flush_quietly, app.state.desired_state)
        if app.state.desired_state.async_pool is not None:
            await app.state.desired_state.async_pool.close()
        leadership.release()
        forget_this_process()
        if app.state.desired_state.reader is not None:
            app.state.desired_state.reader.dispose()
        app.state.engine.dispose()


def _refresh_leadership(app: FastAPI) -> None:
    held = app.state.leadership.refresh()
    app.state.metrics.background_leader.set(1 if held else 0)


async def _leadership_loop(app: FastAPI, interval_s: float) -> None:
    """Keep (or try to take) the background leadership every ``interval_s``."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(_refresh_leadership, app)
        except Exception:  # never fatal: the next round retries
            log.exception("could not check the background leadership")


async def _flush_loop(service: DesiredStateService, interval_s: float) -> None:
    """Write buffered poll times every ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(_flush_quietly, service)


def _flush_quietly(service: DesiredStateService) -> None:
    try:
        service.flush_last_seen()
    except SQLAlchemyError:
        log.exception("could not record device last-seen times")

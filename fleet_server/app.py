"""The FastAPI app factory.

``create_app(settings)`` wires one app: the database engine and session factory (the schema must
already be migrated: ``edgefleet-server init`` and ``run`` do it, tests do it once per session), the
routers of ``fleet_server.api``, ``fleet_server.telemetry.api`` and ``fleet_server.rollouts.api``, the
domain-error mapping, the request metrics middleware, the dashboard (``fleet_server.dashboard``, at
``/ui``) and the background task that keeps TUF timestamp/snapshot fresh.

Everything request handlers need hangs off ``app.state``: ``settings``, ``engine``,
``session_factory``, ``metrics``, ``desired_state`` (the memoised desired-state renderer),
``enroll_limiter`` and ``tuf`` (the hosted repository).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from fleet_server import __version__
from fleet_server.api import ROUTERS
from fleet_server.api.fast_path import DesiredStateFastPath
from fleet_server.dashboard import mount_dashboard
from fleet_server.db import make_engine, make_session_factory
from fleet_server.errors import install_error_handlers
from fleet_server.logs import configure_logging
from fleet_server.observability import Metrics, MetricsMiddleware
from fleet_server.ratelimit import RateLimiter
from fleet_server.rollouts import api as rollouts_api
from fleet_server.services.desired_state import DesiredStateService
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
    for router in (*ROUTERS, telemetry_api.router, rollouts_api.router):
        app.include_router(router)
    mount_dashboard(app)
    app.add_middleware(DesiredStateFastPath, service=app.state.desired_state, metrics=app.state.metrics)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: times the fast path too
    return app


def _attach_state(app: FastAPI, settings: Settings) -> None:
    engine = make_engine(settings.resolved_database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.metrics = Metrics()
    app.state.desired_state = DesiredStateService(engine, settings)
    app.state.enroll_limiter = RateLimiter(settings.enroll_rate_per_minute)
    app.state.tuf = TufHost(settings)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the background tasks (TUF refresh, last-seen flush); stop them and flush on shutdown."""
    tasks = []
    if app.state.settings.background_tasks:
        tasks.append(asyncio.create_task(refresh_loop(app.state.tuf, app.state.settings.tuf_refresh_interval_s)))
        tasks.append(asyncio.create_task(_flush_loop(app.state.desired_state, LAST_SEEN_FLUSH_INTERVAL_S)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.to_thread(_flush_quietly, app.state.desired_state)
        if app.state.desired_state.async_pool is not None:
            await app.state.desired_state.async_pool.close()
        app.state.engine.dispose()


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

"""Operations endpoints: liveness, readiness (database reachable and migrated) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.db import current_revision
from fleet_server.errors import RETRY_AFTER_S
from fleet_server.observability import exposition

router = APIRouter(tags=["operations"])
RETRY = {"Retry-After": RETRY_AFTER_S}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (no dependency checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database unreachable or not migrated"}})
def readyz(request: Request) -> JSONResponse:
    """Ready to serve: the database answers and has a schema revision."""
    try:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        revision = current_revision(request.app.state.engine)
    except SQLAlchemyError as error:
        return JSONResponse({"status": "unavailable", "detail": f"database: {type(error).__name__}"}, 503, RETRY)
    if revision is None:
        return JSONResponse({"status": "unavailable", "detail": "database is not migrated"}, 503, RETRY)
    return JSONResponse({"status": "ready", "schema_revision": revision, "tuf_root": request.app.state.tuf.has_root()})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus exposition: this process's metrics, or every worker's summed (``run --workers N``)."""
    return Response(exposition(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)

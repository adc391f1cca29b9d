"""Bundle registry and TUF admin endpoints (used by ``edgefleet-convert publish`` and the CLI)."""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from fleet_server.api.bodies import read_capped, spool_capped
from fleet_server.api.deps import AdminDep, OperatorDep, SessionDep, SessionRoute, ViewerDep
from fleet_server.audit import record
from fleet_server.schemas import BundleDetail, BundleOut, DbInt, PublicationOut, RootInstalled, TufStateOut
from fleet_server.services import plots, registry

log = logging.getLogger("fleet_server.bundles")
router = APIRouter(prefix="/api/v1/admin", tags=["bundles"], route_class=SessionRoute)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad signature, hash or manifest"}, 401: {"description": "missing or revoked API key"},
    403: {"description": "role too weak"}, 404: {"description": "not found"},
    409: {"description": "version conflict or in use"}, 413: {"description": "too large"},
}  # fmt: skip
MAX_ROOT_BYTES = 1024 * 1024
BINARY_BODY = {
    "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
}
PNG_BODY = {"requestBody": {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}
PNG_ANSWER: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "the PNG image"}}
PlotKind = Literal["report", "agreement"]


@router.get("/tuf/state", response_model=TufStateOut, responses=ERRORS)
def tuf_state(request: Request, _caller: ViewerDep) -> TufStateOut:
    """The trusted root, the current signed targets and the online public keys."""
    host = request.app.state.tuf
    return TufStateOut(root=host.trusted_root(), targets=host.current_targets(), online_keys=host.online_keys())


@router.put("/tuf/root", response_model=RootInstalled, responses=ERRORS, openapi_extra=BINARY_BODY)
async def install_root(request: Request, caller: AdminDep, session: SessionDep) -> RootInstalled:
    """Install root version 1, or rotate to N+1 (signed by the old and the new root keys)."""
    raw = await read_capped(request, MAX_ROOT_BYTES)
    before = request.app.state.tuf.trusted_root()
    version = await run_in_threadpool(request.app.state.tuf.install_root, raw)
    record_root_change(session, caller.actor, before, request.app.state.tuf.trusted_root())
    return RootInstalled(version=version)


def record_root_change(
    session: Session, actor: str, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> None:
    """Audit a root installation with the role keys before and after (not the signatures)."""
    signed_before, signed_after = (before or {}).get("signed"), (after or {}).get("signed")
    version = (signed_after or {}).get("version")
    record(session, actor=actor, action="tuf.root", target_type="tuf_root", target_id=str(version),
           before=signed_before, after=signed_after)  # fmt: skip


@router.post("/publications", response_model=PublicationOut, status_code=201, responses=ERRORS,
             openapi_extra=BINARY_BODY)  # fmt: skip
async def publish(request: Request, caller: OperatorDep, session: SessionDep) -> PublicationOut:
    """Accept a publication (``make_publication`` tar.gz): verified by TUF, then recorded as bundles."""
    settings, host, metrics = request.app.state.settings, request.app.state.tuf, request.app.state.metrics
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.uploads_dir) as scratch:
        path = settings.uploads_dir / scratch / "publication.tar.gz"
        try:
            size = await spool_capped(request, settings.max_publication_bytes, path)
            targets = await run_in_threadpool(host.accept_publication, path)
        except Exception as error:
            metrics.uploads.labels("refused").inc()
            log.warning("publication refused: %s", error, extra={"actor": caller.actor})
            raise
    records = await run_in_threadpool(registry.record_publication, session, host, targets, caller.actor)
    metrics.uploads.labels("accepted").inc()
    log.info("publication accepted", extra={"actor": caller.actor, "targets": targets, "bytes": size})
    metrics.upload_bytes.inc(size)
    return PublicationOut(targets=targets, bundles=[{"name": r.name, "version": r.version} for r in records])


@router.get("/bundles", response_model=list[BundleOut], responses=ERRORS)
def list_bundles(
    _caller: ViewerDep, session: SessionDep, name: str | None = Query(default=None, max_length=100)
) -> list[BundleOut]:
    """Published bundles, newest version first per name."""
    return [BundleOut(**registry.describe_bundle(b)) for b in registry.list_bundles(session, name)]


@router.get("/bundles/{name}/{version}", response_model=BundleDetail, responses=ERRORS)
def show_bundle(name: str, version: DbInt, _caller: ViewerDep, session: SessionDep) -> BundleDetail:
    """One bundle version with its manifest."""
    return BundleDetail(**registry.describe_bundle(registry.get_bundle(session, name, version), with_manifest=True))


@router.post("/bundles/{name}/{version}/deprecate", response_model=BundleOut, responses=ERRORS)
def deprecate_bundle(
    name: str, version: DbInt, caller: OperatorDep, session: SessionDep, undo: bool = Query(default=False)
) -> BundleOut:
    """Mark a version deprecated (``undo=true`` reverses it)."""
    bundle = registry.set_deprecated(session, name=name, version=version, deprecated=not undo, actor=caller.actor)
    return BundleOut(**registry.describe_bundle(bundle))


@router.put("/bundles/{name}/{version}/plots/{kind}", status_code=204, responses=ERRORS, openapi_extra=PNG_BODY)
async def put_plot(
    name: str, version: DbInt, kind: PlotKind, request: Request, caller: OperatorDep, session: SessionDep
) -> Response:
    """Store one of the converter's report plots of a published version (PNG, shown on the dashboard)."""
    png = await read_capped(request, plots.MAX_PLOT_BYTES)
    await run_in_threadpool(plots.put_plot, session, name=name, version=version, kind=kind, png=png,
                            actor=caller.actor)  # fmt: skip
    return Response(status_code=204)


@router.get("/bundles/{name}/{version}/plots/{kind}", response_class=Response, responses={**ERRORS, **PNG_ANSWER})
def get_plot(name: str, version: DbInt, kind: PlotKind, _caller: ViewerDep, session: SessionDep) -> Response:
    """One of the converter's report plots of a version, as uploaded."""
    plot = plots.get_plot(session, name=name, version=version, kind=kind)
    return Response(plot.png, media_type="image/png", headers={"etag": f'"{plot.sha256}"'})


@router.delete("/bundles/{name}/{version}", status_code=204, responses=ERRORS)
def delete_bundle(name: str, version: DbInt, caller: OperatorDep, session: SessionDep) -> Response:
    """Delete a bundle record (409 while an assignment, rollout or device uses it)."""
    registry.delete_bundle(session, name=name, version=version, actor=caller.actor)
    return Response(status_code=204)

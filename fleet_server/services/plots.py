"""The converter's report plots of a bundle version, kept for the dashboard's bundle page.

``edgefleet-convert publish --server`` uploads them after the signed publication: ``report`` (size,
task metric and latency per variant, with their budgets) and ``agreement`` (the heat maps of how the
variants agree across runtimes). They are display only: not signed (they carry timings, which the
reproducible bundle leaves out), never sent to a device, replaced by a later upload, and deleted with
their bundle record. An upload must be a PNG image no larger than :data:`MAX_PLOT_BYTES`.
"""

from __future__ import annotations

import hashlib
import struct

from sqlalchemy import select
from sqlalchemy.orm import Session

from bundles.errors import ConfigError
from fleet_server.audit import record
from fleet_server.db import utcnow
from fleet_server.errors import NotFoundError
from fleet_server.models import BundlePlot
from fleet_server.services.registry import get_bundle

PLOT_KINDS = ("report", "agreement")
"""``report``: the conversion report's plot.png; ``agreement``: its agreement.png."""
MAX_PLOT_BYTES = 1024 * 1024
"""The largest plot taken (the converter's are about 100 KB); the request guard's limit for a buffered body
(``max_json_bytes``, by default the same) applies first."""
MAX_PLOT_PIXELS = 8000
"""The longest side a plot may have (the converter's are under 2,000 pixels)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG image; a :class:`ConfigError` (400) for anything else."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ConfigError("a plot must be a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    if not (0 < width <= MAX_PLOT_PIXELS and 0 < height <= MAX_PLOT_PIXELS):
        raise ConfigError(f"a plot of {width}x{height} pixels is outside 1..{MAX_PLOT_PIXELS} on a side")
    return width, height


def put_plot(session: Session, *, name: str, version: int, kind: str, png: bytes, actor: str) -> BundlePlot:
    """Store (or replace) the ``kind`` plot of ``name@version``; audited as ``bundle.plot``."""
    if kind not in PLOT_KINDS:
        raise ConfigError(f"unknown plot kind {kind[:40]!r}: one of {', '.join(PLOT_KINDS)}")
    check_png(png)
    bundle = get_bundle(session, name, version)
    plot = session.scalar(select(BundlePlot).where(BundlePlot.bundle_id == bundle.id, BundlePlot.kind == kind))
    before = None if plot is None else {"sha256": plot.sha256, "bytes": len(plot.png)}
    if plot is None:
        plot = BundlePlot(bundle_id=bundle.id, kind=kind)
        session.add(plot)
    plot.png, plot.sha256 = png, hashlib.sha256(png).hexdigest()
    plot.uploaded_by, plot.uploaded_at = actor, utcnow()
    record(session, actor=actor, action="bundle.plot", target_type="bundle", target_id=f"{name}@{version}:{kind}",
           before=before, after={"sha256": plot.sha256, "bytes": len(png)})  # fmt: skip
    session.flush()
    return plot


def get_plot(session: Session, *, name: str, version: int, kind: str) -> BundlePlot:
    """The ``kind`` plot of ``name@version`` (404 when the bundle or the plot is missing)."""
    bundle = get_bundle(session, name, version)
    plot = session.scalar(select(BundlePlot).where(BundlePlot.bundle_id == bundle.id, BundlePlot.kind == kind))
    if plot is None:
        raise NotFoundError(f"bundle {name}@{version} has no {kind[:40]} plot")
    return plot


def plot_kinds(session: Session, bundle_id: int) -> list[str]:
    """The kinds of plot stored for a bundle record, in :data:`PLOT_KINDS` order."""
    stored = set(session.scalars(select(BundlePlot.kind).where(BundlePlot.bundle_id == bundle_id)))
    return [kind for kind in PLOT_KINDS if kind in stored]

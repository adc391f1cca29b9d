"""Bundle pages: the registry's versions, and one version's variants with the converter's gate results and plots.

A bundle's manifest carries, per variant, the converter's verdict (``status``: ``passed`` when it ran
in its real runtime and met its gates, ``structural`` when the host could not execute it) and the
reproducible figures it measured (``metrics``: parity, task metric and its drop, size, the budgets it
was checked against under ``gates``); the page draws a size chart from those. The converter's report
plots (size, metric and latency per variant against the budgets; agreement across runtimes) carry
timings, so they are not in the signed bundle: ``edgefleet-convert publish --server`` uploads them
beside it (:mod:`fleet_server.services.plots`) and the page shows those it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.dashboard.charts import Bar, bar_chart, number
from fleet_server.rollouts.models import Rollout
from fleet_server.rollouts.views import summarise_rollout
from fleet_server.services.plots import plot_kinds
from fleet_server.services.registry import describe_bundle, get_bundle, list_bundles, users_of

METRIC_ORDER = (
    "metric", "metric_value", "source_metric_value", "metric_drop", "max_abs_error", "cosine", "top1_agreement",
    "size_bytes", "size_ratio_to_fp32", "golden_atol", "ladder_rank", "preferred",
)  # fmt: skip
"""Known figures first, in this order; anything else a newer converter writes follows, by name."""
USERS_SHOWN = 50


@dataclass
class BundlePage:
    """What one bundle version's page shows."""

    bundle: dict[str, Any]
    manifest: dict[str, Any]
    variants: list[dict[str, Any]]
    chart: Markup
    plots: list[str]
    users: list[str]
    users_total: int
    rollouts: list[dict[str, Any]]


def bundle_rows(session: Session) -> list[dict[str, Any]]:
    """Every published version, by name then newest first."""
    return [describe_bundle(b) for b in list_bundles(session)]


def bundle_page(session: Session, name: str, version: int) -> BundlePage:
    """One version (a 404-mapped error when it is not published)."""
    record = get_bundle(session, name, version)
    manifest = record.manifest if isinstance(record.manifest, dict) else {}
    sizes = {v.get("id"): v.get("size_bytes", 0) for v in record.variants if isinstance(v, dict)}
    variants = [_variant(v, sizes) for v in manifest.get("variants", []) if isinstance(v, dict)]
    users = users_of(session, name, version)
    rollouts = session.scalars(select(Rollout).where(Rollout.model_name == name, Rollout.bundle_version == version)
                               .order_by(Rollout.id.desc()))  # fmt: skip
    return BundlePage(
        bundle=describe_bundle(record), manifest=manifest, variants=variants, chart=_chart(variants),
        plots=plot_kinds(session, record.id), users=users[:USERS_SHOWN], users_total=len(users),
        rollouts=[summarise_rollout(r) for r in rollouts],
    )  # fmt: skip


def _variant(variant: dict[str, Any], sizes: dict[Any, Any]) -> dict[str, Any]:
    metrics = variant.get("metrics") if isinstance(variant.get("metrics"), dict) else {}
    assert isinstance(metrics, dict)
    files_bytes = sum(int(f.get("size_bytes", 0)) for f in variant.get("files", []) if isinstance(f, dict))
    known = [(k, metrics[k]) for k in METRIC_ORDER if k in metrics]
    other = sorted((k, v) for k, v in metrics.items() if k not in METRIC_ORDER and k != "gates")
    budgets = metrics.get("gates") if isinstance(metrics.get("gates"), dict) else {}
    return {
        "id": variant.get("id"), "target": variant.get("target"), "precision": variant.get("precision"),
        "status": variant.get("status", "passed"), "requirements": variant.get("requirements") or {},
        "size_bytes": int(sizes.get(variant.get("id")) or metrics.get("size_bytes") or files_bytes),
        "figures": known + other, "budgets": sorted((budgets or {}).items()),
    }  # fmt: skip


def _chart(variants: list[dict[str, Any]]) -> Markup:
    bars = []
    for v in variants:
        figures = dict(v["figures"])
        measure = figures.get("metric_value", figures.get("top1_agreement"))
        note = f" · {figures.get('metric', 'top-1 agreement')} {number(measure)}" if measure is not None else ""
        bars.append(Bar(str(v["id"]), float(v["size_bytes"]), f"{_size(v['size_bytes'])}{note}"))
    return bar_chart("size per variant", bars) if bars else Markup("")


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"

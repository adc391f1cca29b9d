"""Device events (``docs/telemetry.md``): install results, heartbeats, drops, breaker changes, errors.

Every event has ``id``, ``type``, ``at``, ``model`` and ``version``; the rest depends on the type.
The helpers here only build the dicts; :class:`device_agent.telemetry.recorder.TelemetryRecorder`
stores them in the offline buffer with their priority.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from bundles.contract import Heartbeat, InstallEvent, parse, to_dict

EVENT_TYPES = ("install", "heartbeat", "repair", "drops", "breaker", "error")
INSTALL_RESULTS = ("installed", "failed", "rolled_back")


def utc_now_iso() -> str:
    """Now, as the ISO 8601 UTC string every telemetry item uses."""
    return dt.datetime.now(dt.timezone.utc).isoformat()


def make_event(event_type: str, model: str | None = None, version: int | None = None, **fields: Any) -> dict[str, Any]:
    """An event dict with the common keys filled in."""
    common = {"id": uuid.uuid4().hex, "type": event_type, "at": utc_now_iso(), "model": model, "version": version}
    return {**common, **fields}


def install_event(
    model: str,
    to_version: int,
    result: str,
    from_version: int | None = None,
    deployment_id: int | None = None,
    reason: str | None = None,
    state_path: Sequence[str] = (),
    **details: Any,
) -> dict[str, Any]:
    """The outcome of one install (``bundles.contract.InstallEvent``): ``result`` is ``installed``,
    ``failed`` or ``rolled_back``; ``details`` adds ``id`` (the deployment id), ``status``,
    ``variant``, ``health``, ``error_kind``. Checked against the contract before it is queued."""
    if result not in INSTALL_RESULTS:
        raise ValueError(f"install result must be one of {INSTALL_RESULTS}, got {result!r}")
    event = make_event(
        "install", model, to_version, deployment_id=deployment_id, from_version=from_version, to_version=to_version,
        result=result, reason=None if reason is None else reason[:2000], state_path=list(state_path)[-200:],
    )  # fmt: skip
    event.update(details)
    checked: dict[str, Any] = to_dict(parse(InstallEvent, event, "install event"))
    return checked


def heartbeat_event(uptime_s: float, models: Sequence[Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
    """A ``heartbeat`` (``bundles.contract.Heartbeat``): versions held, health, queue, buffer, repairs."""
    event = make_event("heartbeat", uptime_s=round(max(uptime_s, 0.0), 1), models=list(models), **fields)
    checked: dict[str, Any] = to_dict(parse(Heartbeat, event, "heartbeat"))
    return checked

"""Device events (``docs/telemetry.md``): install results, heartbeats, drops, breaker changes, errors.

Every event has ``id``, ``type``, ``at``, ``model`` and ``version``; the rest depends on the type.
The helpers here only build the dicts; :class:`device_agent.telemetry.recorder.TelemetryRecorder`
stores them in the offline buffer with their priority.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

EVENT_TYPES = ("install", "heartbeat", "drops", "breaker", "error")
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
) -> dict[str, Any]:
    """The outcome of one install: ``result`` is ``installed``, ``failed`` or ``rolled_back``."""
    if result not in INSTALL_RESULTS:
        raise ValueError(f"install result must be one of {INSTALL_RESULTS}, got {result!r}")
    return make_event(
        "install",
        model,
        to_version,
        deployment_id=deployment_id,
        from_version=from_version,
        to_version=to_version,
        result=result,
        reason=reason,
        state_path=list(state_path),
    )

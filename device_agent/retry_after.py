"""How long to wait before trying the fleet server again: the backoff, or the server's ``Retry-After`` if longer.

A fleet server that cannot take a request now (its database busy or down) answers 503 with
``Retry-After``; so does a rate limit (429). The agent's retry loops (the daemon's poll, the telemetry
uploader) wait at least that long, but never longer than their own backoff cap, so that a server cannot
park a device for ever. Standard library only: the uploader imports it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from email.utils import parsedate_to_datetime


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The wait a ``Retry-After`` header asks for (seconds, or an HTTP date), or None without a usable one."""
    value = (headers.get("retry-after") or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


def retry_wait_s(error: BaseException, backoff_s: float, max_s: float) -> float:
    """Seconds before the next try after ``error``: ``backoff_s``, or the server's ``Retry-After`` (carried by a
    :class:`bundles.errors.ServerError`) when longer, at most ``max_s``."""
    asked = getattr(error, "retry_after_s", None)
    return backoff_s if asked is None else max(backoff_s, min(float(asked), max_s))

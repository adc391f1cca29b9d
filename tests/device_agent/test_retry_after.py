"""The wait a fleet server asks for with ``Retry-After`` (seconds or an HTTP date), bounded by the agent's cap."""

from __future__ import annotations

import datetime as dt
from email.utils import format_datetime

import pytest

from bundles.errors import ServerError, TransportError
from device_agent.retry_after import retry_after_s, retry_wait_s


@pytest.mark.parametrize(("value", "expected"), [("5", 5.0), (" 120 ", 120.0), ("0", 0.0)])
def test_seconds_are_read_as_they_are(value: str, expected: float) -> None:
    assert retry_after_s({"retry-after": value}) == expected


def test_an_http_date_is_the_time_left_until_it() -> None:
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=90)
    assert 85.0 <= (retry_after_s({"retry-after": format_datetime(when, usegmt=True)}) or 0.0) <= 90.0
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    assert retry_after_s({"retry-after": format_datetime(past, usegmt=True)}) == 0.0


@pytest.mark.parametrize("value", ["", "soon", "-5", "1.5e3", "Mon, 99 Foo 2026"])
def test_an_unusable_header_asks_for_nothing(value: str) -> None:
    assert retry_after_s({"retry-after": value}) is None
    assert retry_after_s({}) is None


def test_the_wait_is_the_longer_of_the_backoff_and_the_request_but_at_most_the_cap() -> None:
    assert retry_wait_s(ServerError("503", retry_after_s=30.0), backoff_s=4.0, max_s=600.0) == 30.0
    assert retry_wait_s(ServerError("503", retry_after_s=1.0), backoff_s=4.0, max_s=600.0) == 4.0
    assert retry_wait_s(ServerError("503", retry_after_s=1e9), backoff_s=4.0, max_s=600.0) == 600.0
    assert retry_wait_s(ServerError("500"), backoff_s=4.0, max_s=600.0) == 4.0
    assert retry_wait_s(TransportError("connection refused"), backoff_s=4.0, max_s=600.0) == 4.0

"""The dashboard's session cookie and CSRF tokens (pure: no server)."""

from __future__ import annotations

import time

import itsdangerous.timed

from fleet_server.dashboard.sessions import SESSION_MAX_AGE_S, SessionCodec, WebSession, anonymous_session

PEPPER = "test-pepper-0123456789abcdef"


def test_a_session_survives_its_cookie_round_trip():
    codec = SessionCodec(PEPPER)
    web = WebSession("sid-1", 7, "binding", 1_700_000_000.0)
    assert codec.loads(codec.dumps(web)) == web


def test_a_tampered_forged_or_malformed_cookie_reads_as_no_session():
    codec = SessionCodec(PEPPER)
    cookie = codec.dumps(WebSession("sid-1", 7, "binding", 1.0))
    payload, _, signature = cookie.partition(".")
    forged = SessionCodec("another-pepper-0123456789").dumps(WebSession("sid-1", 1, "binding", 1.0))
    for bad in (
        cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"),
        forged,
        "",
        "garbage",
        payload,
        codec._serializer.dumps({"sid": "x"}),
        codec._serializer.dumps(["sid", "not-an-id", "", 0]),
    ):  # noqa: SLF001
        assert codec.loads(bad) is None, bad


def test_a_cookie_older_than_the_session_lifetime_reads_as_no_session(monkeypatch):
    codec = SessionCodec(PEPPER)
    cookie = codec.dumps(anonymous_session())
    later = time.time() + SESSION_MAX_AGE_S + 5
    monkeypatch.setattr(itsdangerous.timed.time, "time", lambda: later)
    assert codec.loads(cookie) is None


def test_csrf_tokens_belong_to_one_session_and_one_pepper():
    codec = SessionCodec(PEPPER)
    one, two = anonymous_session(), anonymous_session()
    assert codec.csrf_matches(one, codec.csrf_token(one))
    assert not codec.csrf_matches(two, codec.csrf_token(one))
    assert not SessionCodec("another-pepper-0123456789").csrf_matches(one, codec.csrf_token(one))
    assert not codec.csrf_matches(one, "")

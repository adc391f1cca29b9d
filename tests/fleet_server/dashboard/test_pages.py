"""The dashboard over HTTP (in-process, SQLite and PostgreSQL): login, sessions, CSRF, roles enforced on
the server, device-supplied strings escaped, every page rendering real data.

The browser tests (``test_browser.py``) walk the same pages in Chromium; these check what a browser
would hide: raw HTML, headers, cookies, and requests no page would send.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fleet_server.dashboard.sessions import COOKIE_NAME
from fleet_server.db import session_scope
from fleet_server.models import AuditEntry
from fleet_server.rollouts.models import Rollout
from fleet_server.services.api_keys import revoke_api_key
from tests.fleet_server.conftest import png_image
from tests.fleet_server.dashboard.fleet_data import XSS_PAYLOADS, build_fleet, publish_digits

UI = "/ui"


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def login(http: TestClient, key: str) -> None:
    form = http.get(f"{UI}/login")
    answer = http.post(
        f"{UI}/login", data={"csrf_token": csrf_of(form.text), "api_key": key, "next": "/"}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == f"{UI}/"


@pytest.fixture
def https(app):
    """A client speaking https to the app (the session cookie is Secure: public_url is https)."""
    with TestClient(app, base_url="https://testserver") as http:
        yield http


@pytest.fixture
def fleet(https, app, session_factory, make_enroll_token, operator_headers, tmp_path):
    manifests = publish_digits(session_factory, tmp_path)
    return build_fleet(https, make_enroll_token("lab"), operator_headers, manifests, devices=3)


def state_of(session_factory, rollout_id: int) -> str:
    with session_factory() as session:
        return session.scalars(select(Rollout.state).where(Rollout.id == rollout_id)).one()


def test_pages_need_a_login_and_render_real_data_after_it(https, fleet, make_api_key):
    assert https.get(f"{UI}/", follow_redirects=False).headers["location"] == f"{UI}/login?next=/ui/"
    login(https, make_api_key("viewer"))
    overview = https.get(f"{UI}/")
    assert overview.status_code == 200
    assert fleet.devices[0] in overview.text and "digits@1" in overview.text and "jetson-nano" in overview.text
    pages = [
        f"/devices/{fleet.devices[0]}",
        "/bundles",
        "/bundles/digits/2",
        "/rollouts",
        f"/rollouts/{fleet.rollout_id}",
        "/drift",
        "/drift/digits?hours=6",
    ]
    for page in pages:
        answer = https.get(UI + page)
        assert answer.status_code == 200, (page, answer.text[:500])
    device = https.get(f"{UI}/devices/{fleet.devices[0]}").text
    assert "install history" in device.lower() and "onnx-fp32" in device and "&#34;7&#34;" in device
    assert "<svg" in https.get(f"{UI}/drift/digits").text


def test_every_response_carries_the_security_headers(https, fleet, make_api_key):
    login(https, make_api_key("viewer"))
    for path in ("/", "/login", "/static/dashboard.css", "/no-such-page"):
        headers = https.get(UI + path).headers
        assert (
            "script-src 'self'" in headers["content-security-policy"]
            and "unsafe-inline" not in headers["content-security-policy"]
        )
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"


def test_the_session_cookie_is_httponly_samesite_strict_secure_and_scoped(https, make_api_key):
    cookie = https.get(f"{UI}/login").headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    for attribute in ("HttpOnly", "SameSite=strict", "Secure", "Path=/ui/", "Max-Age=28800"):
        assert attribute.lower() in cookie.lower(), cookie


def test_a_session_planted_before_login_never_becomes_authenticated(app, https, make_api_key):
    with TestClient(app, base_url="https://testserver") as attacker:
        attacker_form = attacker.get(f"{UI}/login").text
        planted = attacker.cookies[COOKIE_NAME]
        https.cookies.set(COOKIE_NAME, planted, domain="testserver.local", path="/ui/")  # as the server sets it
        victim_form = https.get(f"{UI}/login").text
        assert csrf_of(victim_form) == csrf_of(attacker_form)  # the victim's browser really uses the planted id
        login(https, make_api_key("operator"))
        assert https.cookies[COOKIE_NAME] != planted
        assert https.get(f"{UI}/rollouts").status_code == 200
        assert attacker.get(f"{UI}/", follow_redirects=False).status_code == 303  # still anonymous


def test_a_wrong_key_is_refused_with_a_message_and_no_session(https, make_api_key):
    form = https.get(f"{UI}/login")
    answer = https.post(f"{UI}/login", data={"csrf_token": csrf_of(form.text), "api_key": "efk_nope", "next": "/"})
    assert answer.status_code == 401 and "unknown or revoked API key" in answer.text
    assert https.get(f"{UI}/", follow_redirects=False).status_code == 303


def test_repeated_failed_logins_lock_the_client_out_even_with_the_right_key(app, https, make_api_key):
    """Guessing keys costs a token per miss; once spent, the right key is refused too until the bucket refills."""
    misses = app.state.settings.login_failures_per_minute
    form = https.get(f"{UI}/login")
    for _ in range(misses):
        data = {"csrf_token": csrf_of(form.text), "api_key": "efk_guess", "next": "/"}
        assert https.post(f"{UI}/login", data=data).status_code == 401
    good = {"csrf_token": csrf_of(form.text), "api_key": make_api_key("admin"), "next": "/"}
    answer = https.post(f"{UI}/login", data=good, follow_redirects=False)
    assert answer.status_code == 429 and "too many failed logins" in answer.text
    assert https.get(f"{UI}/", follow_redirects=False).status_code == 303  # still not logged in


def test_successful_logins_spend_nothing_from_the_failed_login_budget(app, https, make_api_key):
    key = make_api_key("viewer")
    for _ in range(app.state.settings.login_failures_per_minute + 2):
        login(https, key)


def test_login_needs_the_forms_csrf_token(https, make_api_key):
    https.get(f"{UI}/login")
    answer = https.post(f"{UI}/login", data={"csrf_token": "0" * 64, "api_key": make_api_key("admin")})
    assert answer.status_code == 403 and "CSRF" in answer.text


def test_after_login_the_target_stays_inside_the_dashboard(https, make_api_key):
    form = https.get(f"{UI}/login")
    for target, expected in (
        ("/rollouts", "/ui/rollouts"),
        ("//evil.example/x", "/ui/"),
        ("https://evil.example/", "/ui/"),
    ):
        answer = https.post(
            f"{UI}/login",
            data={"csrf_token": csrf_of(form.text), "api_key": make_api_key("viewer"), "next": target},
            follow_redirects=False,
        )
        assert answer.headers["location"] == expected
        form = https.get(f"{UI}/login")


def test_a_viewer_cannot_act_even_with_a_valid_csrf_token(https, fleet, make_api_key, session_factory):
    login(https, make_api_key("viewer"))
    page = https.get(f"{UI}/rollouts/{fleet.rollout_id}").text
    assert 'data-action="pause"' not in page and "Read-only" in page
    answer = https.post(f"{UI}/rollouts/{fleet.rollout_id}/pause", data={"csrf_token": csrf_of(page)})
    assert answer.status_code == 403 and "needs operator" in answer.text
    assert state_of(session_factory, fleet.rollout_id) == "running"


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({}, None),
        ({}, "f" * 64),
        ({"origin": "https://evil.example"}, "valid"),
        ({"sec-fetch-site": "cross-site"}, "valid"),
    ],
    ids=["no-token", "wrong-token", "other-origin", "cross-site-fetch"],
)
def test_an_operator_action_without_this_sessions_csrf_proof_is_refused(
    https, fleet, make_api_key, session_factory, headers, token
):
    login(https, make_api_key("operator"))
    valid = csrf_of(https.get(f"{UI}/rollouts/{fleet.rollout_id}").text)
    data = {} if token is None else {"csrf_token": valid if token == "valid" else token}
    answer = https.post(f"{UI}/rollouts/{fleet.rollout_id}/pause", data=data, headers=headers)
    assert answer.status_code == 403, answer.text
    assert state_of(session_factory, fleet.rollout_id) == "running"


def test_a_post_whose_origin_is_the_public_url_passes_behind_a_rewriting_proxy(
    https, fleet, make_api_key, session_factory
):
    login(https, make_api_key("operator"))
    token = csrf_of(https.get(f"{UI}/rollouts/{fleet.rollout_id}").text)
    answer = https.post(
        f"{UI}/rollouts/{fleet.rollout_id}/pause",
        data={"csrf_token": token},
        headers={"origin": "https://fleet.test"},
        follow_redirects=False,
    )  # public_url's host
    assert answer.status_code == 303 and state_of(session_factory, fleet.rollout_id) == "paused"


def test_an_operator_acts_through_the_rollout_service_and_is_audited(https, fleet, make_api_key, session_factory):
    login(https, make_api_key("operator", name="ops-alice"))
    token = csrf_of(https.get(f"{UI}/rollouts/{fleet.rollout_id}").text)
    answer = https.post(f"{UI}/rollouts/{fleet.rollout_id}/pause", data={"csrf_token": token}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"].endswith("?done=pause")
    assert state_of(session_factory, fleet.rollout_id) == "paused"
    refused = https.post(f"{UI}/rollouts/{fleet.rollout_id}/pause", data={"csrf_token": token})
    assert refused.status_code == 409 and "allowed: abort, approve, resume, rollback" in refused.text
    with session_factory() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "rollout.pause")).one()
    assert entry.actor.endswith(":ops-alice")


def test_a_revoked_key_ends_its_sessions_at_the_next_click(https, make_api_key, session_factory):
    key = make_api_key("operator", name="soon-revoked")
    login(https, key)
    assert https.get(f"{UI}/rollouts").status_code == 200
    with session_scope(session_factory) as session:
        from fleet_server.models import ApiKey

        key_id = session.scalars(select(ApiKey.id).where(ApiKey.name == "soon-revoked")).one()
        revoke_api_key(session, key_id=key_id, actor="test")
    assert https.get(f"{UI}/rollouts", follow_redirects=False).status_code == 303


def test_device_supplied_strings_are_escaped_everywhere_they_appear(https, fleet, make_api_key):
    login(https, make_api_key("viewer"))
    for path in ("/", f"/devices/{fleet.hostile}", f"/rollouts/{fleet.rollout_id}", "/bundles/digits/1"):
        html = https.get(UI + path).text
        for payload in XSS_PAYLOADS:
            assert payload not in html, (path, payload)
    device = https.get(f"{UI}/devices/{fleet.hostile}").text
    assert "&lt;svg onload=window.__xss=1&gt;" in device and "&lt;img src=x onerror=window.__xss=2&gt;" in device
    assert "&#34;&gt;&lt;script&gt;window.__xss=3&lt;/script&gt;" in device


def test_the_bundle_page_shows_the_converters_plots_to_a_logged_in_key_only(https, fleet, make_api_key,
                                                                            operator_headers):  # fmt: skip
    image = png_image(80, 40)
    upload = {**operator_headers, "Content-Type": "image/png"}
    assert https.put("/api/v1/admin/bundles/digits/2/plots/report", content=image, headers=upload).status_code == 204
    plot = f"{UI}/bundles/digits/2/plots/report.png"
    assert https.get(plot, follow_redirects=False).status_code == 303  # to the login form
    login(https, make_api_key("viewer"))
    page = https.get(f"{UI}/bundles/digits/2").text
    assert f'src="{plot}"' in page and "plots/agreement.png" not in page
    answer = https.get(plot)
    assert answer.status_code == 200 and answer.content == image and answer.headers["content-type"] == "image/png"
    assert answer.headers["x-content-type-options"] == "nosniff" and "default-src 'none'" in answer.headers[
        "content-security-policy"]  # fmt: skip
    assert "None uploaded" in https.get(f"{UI}/bundles/digits/1").text
    missing = https.get(f"{UI}/bundles/digits/1/plots/report.png")
    assert missing.status_code == 404 and "digits@1 has no report plot" in missing.text
    assert https.get(f"{UI}/bundles/digits/1/plots/latency.png").status_code == 400


def test_unknown_things_get_an_html_page_with_the_reason(https, make_api_key):
    login(https, make_api_key("viewer"))
    for path, status, text in (
        ("/devices/ghost", 404, "device ghost does not exist"),
        ("/bundles/digits/9", 404, "bundle digits@9 is not published"),
        ("/rollouts/999", 404, "rollout 999"),
        ("/rollouts/abc", 400, "rollout_id"),
        ("/drift/digits?hours=0", 400, "hours"),
        ("/nowhere", 404, "no such page"),
    ):
        answer = https.get(UI + path)
        assert answer.status_code == status and text in answer.text, (path, answer.status_code, answer.text[:300])
        assert answer.headers["content-type"].startswith("text/html")

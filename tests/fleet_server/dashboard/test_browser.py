"""The dashboard in a real headless Chromium: Debian's ``/usr/bin/chromium`` driven by Playwright (which
never downloads a browser here), against the real fleet server on loopback (uvicorn, PostgreSQL) with
devices, bundles (with a converter's plot), a rollout and telemetry arranged through the real device and admin APIs.

One browser for the module, a fresh browser context (cookies, storage) per test. Screenshots of every
page go to ``build/test-artifacts/dashboard/`` (the path is printed).
"""

from __future__ import annotations

import datetime as dt
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet_server.dashboard.sessions import COOKIE_NAME
from tests.fleet_server.conftest import auth, png_image
from tests.fleet_server.dashboard.fleet_data import (
    ROLLOUTS,
    XSS_PAYLOADS,
    Fleet,
    build_fleet,
    install_event,
    publish_digits,
    report,
    running,
    window,
)

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[3] / "build" / "test-artifacts" / "dashboard"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium, headless, for the whole module."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install the Debian package 'chromium' (requirements/apt.txt)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {ARTIFACTS}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(base_url=live_server, viewport={"width": 1360, "height": 900})
    context.set_default_timeout(10_000)
    tab = context.new_page()
    yield tab
    context.close()


@pytest.fixture
def operator(live_server, make_api_key) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, headers=auth(make_api_key("operator")), timeout=10) as client:
        yield client


@pytest.fixture
def fleet_factory(live_server, operator, session_factory, make_enroll_token, tmp_path):
    manifests = publish_digits(session_factory, tmp_path)

    def make(**rollout) -> Fleet:
        with httpx.Client(base_url=live_server, timeout=10) as devices:
            return build_fleet(devices, make_enroll_token("lab"), dict(operator.headers), manifests, rollout=rollout)

    return make


def log_in(page, key: str, path: str = "/ui/") -> None:
    page.goto(path)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"**{path}")


def shoot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def rollout_state(operator: httpx.Client, rollout_id: int) -> str:
    return operator.get(f"{ROLLOUTS}/{rollout_id}").json()["state"]


def run_first_wave(live_server: str, operator: httpx.Client, fleet: Fleet) -> None:
    """Release wave 1, let its devices install digits@2 and report healthy windows past the soak, evaluate."""
    released = operator.post(f"{ROLLOUTS}/{fleet.rollout_id}/evaluate").json()
    assert released["waves"][0]["released"] >= 1, released
    detail = operator.get(f"{ROLLOUTS}/{fleet.rollout_id}?devices=true").json()["device_detail"]
    wave_one = [d["device_id"] for d in detail if d["released_at"]]
    with httpx.Client(base_url=live_server, timeout=10) as http:
        for round_ in range(2):
            now = dt.datetime.now(dt.timezone.utc)
            for device_id in wave_one:
                headers = fleet.headers[device_id]
                if round_ == 0:
                    inventory = {**fleet.inventories[device_id], "installed": [running(2)]}
                    assert http.put("/api/v1/device/inventory", json=inventory, headers=headers).status_code == 204
                events = [install_event(2, now, 1, rollout_id=fleet.rollout_id)] if round_ == 0 else []
                report(http, headers, events, [window(fleet.manifests[2], 2, now, requests=30)])
            time.sleep(1.2)  # past the 1 s soak
    operator.post(f"{ROLLOUTS}/{fleet.rollout_id}/evaluate").raise_for_status()


def test_an_operator_walks_every_page_with_real_data(page, live_server, operator, fleet_factory, make_api_key):
    fleet = fleet_factory()
    run_first_wave(live_server, operator, fleet)
    plot = png_image(640, 160)  # as edgefleet-convert publish --server uploads the report's plot.png
    operator.put("/api/v1/admin/bundles/digits/2/plots/report", content=plot,
                 headers={"Content-Type": "image/png"}).raise_for_status()  # fmt: skip
    with httpx.Client(base_url=live_server) as attacker:  # session fixation: a planted pre-login cookie
        attacker.get("/ui/login")
        planted = attacker.cookies[COOKIE_NAME]
        page.context.add_cookies([{"name": COOKIE_NAME, "value": planted, "url": f"{live_server}/ui/"}])
        log_in(page, make_api_key("operator", name="ops-dana"))
        (cookie,) = [c for c in page.context.cookies() if c["name"] == COOKIE_NAME]
        assert cookie["value"] != planted and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert attacker.get("/ui/", follow_redirects=False).status_code == 303

    assert page.get_by_test_id("whoami").inner_text().startswith("ops-dana")
    assert "digits@2" in page.get_by_test_id("by-version").inner_text()
    assert "jetson-nano" in page.get_by_test_id("by-hw").inner_text()
    assert page.get_by_test_id("devices").locator("tbody tr").count() == len(fleet.devices) + 1
    shoot(page, "01-fleet")

    page.get_by_role("link", name=fleet.devices[0]).click()
    assert page.get_by_test_id("device-id").inner_text() == fleet.devices[0]
    assert "onnxruntime 1.20.1" in page.get_by_test_id("inventory").inner_text()
    assert "installed" in page.get_by_test_id("installs").inner_text()
    assert '"7"' in page.get_by_test_id("samples").inner_text()
    assert "digits@1" in page.get_by_test_id("health").inner_text()
    shoot(page, "02-device")

    page.get_by_role("link", name="Bundles", exact=True).click()
    page.get_by_role("link", name="digits@2").click()
    assert "onnx-fp32" in page.get_by_test_id("variants").inner_text()
    assert page.locator("svg.chart.bars rect.bar").count() == 1
    image = page.get_by_test_id("plots").locator("img")
    assert image.count() == 1 and image.evaluate("img => img.complete && img.naturalWidth") == 640  # decoded
    shoot(page, "03-bundle")

    page.get_by_role("link", name="Rollouts", exact=True).click()
    page.get_by_role("link", name=str(fleet.rollout_id), exact=True).click()
    wave_one = page.get_by_test_id("wave-1")
    assert "passed" in wave_one.inner_text() and "error_rate<0.05 min=10" in wave_one.inner_text()
    assert wave_one.locator("svg.chart polyline.series").count() == 2  # error_rate and install_success
    assert wave_one.locator("svg.chart line.threshold").count() == 2
    assert "advance" in page.get_by_test_id("decisions").inner_text()
    shoot(page, "04-rollout")

    page.get_by_role("link", name="Drift", exact=True).click()
    page.get_by_role("link", name="digits").click()
    page.get_by_role("link", name="1 h", exact=True).click()
    charts = page.get_by_test_id("drift-charts").locator("svg.chart")
    assert charts.count() == 5  # f0..f3 and output:label
    assert charts.first.locator("polyline.series").count() == 2  # digits@1 and digits@2
    shoot(page, "05-drift")


def test_an_operator_approves_and_pauses_a_rollout_through_the_ui(page, operator, fleet_factory, make_api_key):
    fleet = fleet_factory(approval="start")
    assert rollout_state(operator, fleet.rollout_id) == "awaiting_approval"
    log_in(page, make_api_key("operator", name="ops-eve"), f"/ui/rollouts/{fleet.rollout_id}")

    page.get_by_role("button", name="Approve").click()
    assert page.get_by_test_id("rollout-state").inner_text() == "running"
    assert rollout_state(operator, fleet.rollout_id) == "running"
    page.get_by_role("button", name="Pause").click()
    assert page.get_by_test_id("rollout-state").inner_text() == "paused"
    assert page.get_by_test_id("done").inner_text() == "pause: done."

    page.once("dialog", lambda dialog: dialog.dismiss())  # "Abort rollout N?": the operator changes their mind
    page.get_by_role("button", name="Abort").click()
    assert rollout_state(operator, fleet.rollout_id) == "paused"
    decisions = operator.get(f"{ROLLOUTS}/{fleet.rollout_id}").json()["decisions"]
    assert [(d["action"], d["actor"].split(":")[-1]) for d in decisions[-2:]] == [
        ("approve", "ops-eve"),
        ("pause", "ops-eve"),
    ]
    shoot(page, "06-rollout-paused")


def test_a_viewer_sees_no_controls_and_a_forged_post_is_refused(page, operator, fleet_factory, make_api_key):
    fleet = fleet_factory()
    log_in(page, make_api_key("viewer"), f"/ui/rollouts/{fleet.rollout_id}")
    assert page.get_by_test_id("read-only").is_visible()
    assert page.locator("button[data-action]").count() == 0
    token = page.locator("form[action='/ui/logout'] input[name=csrf_token]").get_attribute("value")
    status = page.evaluate(
        """async ([url, token]) => (await fetch(url, {method: "POST", body: new URLSearchParams({csrf_token: token})}))
             .status""",
        [f"/ui/rollouts/{fleet.rollout_id}/pause", token],
    )
    assert status == 403
    assert rollout_state(operator, fleet.rollout_id) == "running"


def test_device_supplied_markup_is_shown_as_text_and_never_runs(page, fleet_factory, make_api_key):
    fleet = fleet_factory()
    log_in(page, make_api_key("viewer"))
    for path in ("/ui/", f"/ui/devices/{fleet.hostile}", f"/ui/rollouts/{fleet.rollout_id}"):
        page.goto(path)
        assert page.evaluate("window.__xss") is None, path
        assert page.locator("svg[onload], img[onerror], main script").count() == 0, path
    text = page.goto(f"/ui/devices/{fleet.hostile}") and page.locator("main").inner_text()
    for payload in XSS_PAYLOADS:
        assert payload in text, payload
    shoot(page, "07-hostile-device")


class _Attacker(http.server.BaseHTTPRequestHandler):
    """Serves a page on another port of the same host that auto-posts a form to the dashboard."""

    target = ""

    def do_GET(self) -> None:  # noqa: N802
        body = (f'<form id="f" method="post" action="{self.target}"><input name="csrf_token" value="guess"></form>'
                '<script>document.getElementById("f").submit()</script>').encode()  # fmt: skip
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass


def test_a_form_posted_from_another_site_is_refused(page, live_server, operator, fleet_factory, make_api_key):
    fleet = fleet_factory()
    log_in(page, make_api_key("operator"))
    _Attacker.target = f"{live_server}/ui/rollouts/{fleet.rollout_id}/pause"
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        page.wait_for_url(f"**/ui/rollouts/{fleet.rollout_id}/pause")
        assert "refused" in page.get_by_test_id("error").inner_text()
    finally:
        evil.shutdown()
    assert rollout_state(operator, fleet.rollout_id) == "running"

"""Whatever a device (or a careless client) sends is refused with a 4xx naming the field, never a 500.

Each test is one finding of issue 15, run against the real app on SQLite and PostgreSQL; the body
size and rate-limit tests go through uvicorn on loopback with raw sockets, so that what is measured
is what the server reads before it answers.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from urllib.parse import urlparse

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from fleet_server.db import session_scope
from fleet_server.models import Device, DeviceEvent, MetricWindow, PredictionSample
from tests.fleet_server.conftest import default_inventory, enroll_device

AT = "2026-11-29T12:00:00+00:00"
END = "2026-11-29T12:01:00+00:00"
TELEMETRY = "/api/v1/device/telemetry"


def window_text(counters: str = '{"requests": 60}', **fields: str) -> str:
    """A window as raw JSON text (so that NaN, 1e309 and lone surrogates reach the server as sent)."""
    extra = "".join(f', "{k}": {v}' for k, v in fields.items())
    return (f'{{"id": "w1", "model": "digits", "version": 3, "start": "{AT}", "end": "{END}", '
            f'"counters": {counters}{extra}}}')  # fmt: skip


def batch_text(windows: str = "", events: str = "", samples: str = "") -> bytes:
    return (f'{{"batch_id": "{uuid.uuid4().hex}", "windows": [{windows}], "events": [{events}], '
            f'"samples": [{samples}]}}').encode()  # fmt: skip


def post_telemetry(client, device, body: bytes):
    return client.post(TELEMETRY, content=body, headers={**device.headers, "Content-Type": "application/json"})


def stored(session_factory) -> tuple[int, int, int]:
    with session_scope(session_factory) as session:
        return tuple(session.scalar(select(func.count()).select_from(t)) for t in (DeviceEvent, MetricWindow,
                                                                                   PredictionSample))  # fmt: skip


@pytest.mark.parametrize(
    ("window", "field"),
    [
        (window_text('{"requests": 1e309}'), "windows[0].counters.requests"),
        (window_text('{"requests": NaN}'), "windows[0].counters.requests"),
        (window_text('{"requests": -Infinity}'), "windows[0].counters.requests"),
        (window_text('{"requests": 1' + "0" * 400 + "}"), "windows[0].counters.requests"),
        (window_text('{"requests": -3}'), "windows[0].counters.requests"),
        (window_text('{"requests": 2.5}'), "windows[0].counters.requests"),
        (window_text('{"requests": 5, "errors": 9}'), "windows[0].counters.errors"),
        (window_text(latency_ms='{"counts": [1, "2", 3]}'), "windows[0].latency_ms.counts[1]"),
        (window_text(latency_ms='{"counts": [1e400]}'), "windows[0].latency_ms.counts[0]"),
        (window_text(features='{"f0": [1, 2, NaN]}'), "windows[0].features.f0[2]"),
        (window_text(shadow='{"compared": 3, "agreed": 4}'), "windows[0].shadow.agreed"),
        (window_text(model='"dig\\ud800its"'), "windows[0].model"),
    ],
)
def test_a_window_breaking_the_contract_is_refused_naming_the_field(client, make_device, session_factory, window,
                                                                     field):  # fmt: skip
    response = post_telemetry(client, make_device(), batch_text(windows=window))
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(field)
    assert stored(session_factory) == (0, 0, 0)  # nothing of the batch was kept


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (f'{{"id": "e", "type": "error", "at": "{AT}", "message": "bad \\udc00 text"}}', "events[0].message"),
        (f'{{"id": "e", "type": "error", "at": "{AT}", "x": {"[" * 2000}{"]" * 2000}}}', "events[0]"),
        (f'{{"id": "e", "type": "error", "at": "{AT}", "x": {"[" * 40}{"]" * 40}}}', "events[0].x"),
        ('{"id": "e", "type": "error", "at": "0001-01-01T00:00:00+14:00"}', "events[0].at"),
        ('{"id": "e", "type": "error", "at": "9999-12-31T23:59:59-14:00"}', "events[0].at"),
        (f'{{"id": "e", "type": "error", "at": "{AT}", "message": "{"x" * 70_000}"}}', "events[0].message"),
    ],
)
def test_hostile_event_text_nesting_and_times_are_refused(client, make_device, session_factory, event, field):
    response = post_telemetry(client, make_device(), batch_text(events=event))
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(field)
    assert stored(session_factory) == (0, 0, 0)


def test_nan_in_a_sample_never_reaches_postgresql_copy(client, make_device, session_factory):
    sample = f'{{"id": "s", "at": "{AT}", "model": "digits", "version": 3, "capture_reason": "rate", "x": NaN}}'
    response = post_telemetry(client, make_device(), batch_text(samples=sample))
    assert response.status_code == 400 and response.json()["detail"].startswith("samples[0].x")


def test_a_good_batch_with_non_ascii_text_is_still_stored(client, make_device, session_factory):
    event = f'{{"id": "e", "type": "error", "at": "{AT}", "message": "caf\\u00e9 \\ud83d\\ude00"}}'
    response = post_telemetry(client, make_device(), batch_text(windows=window_text(), events=event))
    assert response.status_code == 200, response.text
    assert stored(session_factory) == (1, 1, 0)


@pytest.mark.parametrize(
    ("capabilities", "field"),
    [
        ('{"arch": "aarch64", "os": "linux", "memory_mb": NaN}', "body.capabilities.memory_mb"),
        ('{"arch": "aarch64", "os": "linux", "memory_mb": 1e300}', "capabilities.memory_mb"),
        ('{"arch": "aarch64", "os": "linux", "disk_free_mb": -5}', "capabilities.disk_free_mb"),
        ('{"arch": "aarch64", "os": "linux", "extra": "\\udfff"}', "body.capabilities.extra"),
    ],
)
def test_inventory_numbers_and_text_are_checked(client, make_device, capabilities, field):
    device = make_device()
    body = f'{{"capabilities": {capabilities}, "installed": []}}'.encode()
    response = client.put("/api/v1/device/inventory", content=body,
                          headers={**device.headers, "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(field)


@pytest.mark.parametrize("installed", [5, "x", [5], [{"name": "digits", "version": -1}]])
def test_enrollment_with_a_malformed_installed_list_is_a_400(client, make_enroll_token, session_factory, installed):
    response = enroll_device(client, make_enroll_token(), {**default_inventory(), "installed": installed})
    assert response.status_code == 400, response.text
    assert "inventory.installed" in response.json()["detail"]
    with session_scope(session_factory) as session:
        assert session.scalar(select(func.count()).select_from(Device)) == 0


@pytest.mark.parametrize("soak", [1e14, "1e14", "400d", "NaN", 1e309])
def test_a_rollout_duration_out_of_bounds_is_refused(client, operator_headers, soak):
    body = {"bundle": "digits@2", "targets": ["all"], "soak": soak}
    raw = json.dumps(body, allow_nan=True).replace("Infinity", "1e309")
    response = client.post("/api/v1/admin/rollouts", content=raw,
                           headers={**operator_headers, "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 400, response.text
    assert "soak" in response.json()["detail"] or "duration" in response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/admin/rollouts/99999999999999999999",
        "/api/v1/admin/rollouts/-1",
        "/api/v1/admin/api-keys/99999999999999999999",
        "/api/v1/admin/enroll-tokens/99999999999999999999",
        "/api/v1/admin/bundles/digits/99999999999999999999",
        "/api/v1/admin/telemetry/summary?model=digits&since=0001-01-01T00:00:00",
        "/api/v1/admin/telemetry/summary?model=digits&since=9999-12-31T23:59:59-14:00",
        "/api/v1/admin/telemetry/cohort?model=digits&version=99999999999999999999&device_id=x",
        "/api/v1/admin/telemetry/samples?until=0001-01-01T00:00:00%2B14:00",
        "/api/v1/admin/drift/digits?since=0001-01-01T00:00:00",
    ],
)
def test_admin_reads_with_edge_timestamps_and_huge_ids_are_4xx(client, admin_headers, path):
    method = "DELETE" if "api-keys" in path or "enroll-tokens" in path else "GET"
    response = client.request(method, path, headers=admin_headers)
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:200])


def test_reads_of_an_inventory_stored_with_a_lone_surrogate_answer_with_it_escaped(
    app, admin_headers, make_device, make_api_key, db_engine
):
    """Rows stored before the strict check (any JSON column: PostgreSQL's json type keeps a ``\\udfff`` escape)
    must not turn the device list, a device's API read or its dashboard page into a 500."""
    from fastapi.testclient import TestClient

    from tests.fleet_server.dashboard.test_pages import login

    device = make_device()
    with db_engine.begin() as connection:
        connection.execute(sa.text("UPDATE devices SET capabilities = :c WHERE id = :d"),
                           {"c": '{"arch": "aarch64", "os": "linux", "extra": "worn \\udfff flash"}',
                            "d": device.device_id})  # fmt: skip
    with TestClient(app, base_url="https://testserver") as http:
        listing = http.get("/api/v1/admin/devices", headers=admin_headers)
        one = http.get(f"/api/v1/admin/devices/{device.device_id}", headers=admin_headers)
        login(http, make_api_key("viewer"))
        page = http.get(f"/ui/devices/{device.device_id}")
    assert listing.status_code == 200 and one.status_code == 200 and page.status_code == 200, page.text[:300]
    assert one.json()["capabilities"]["extra"] == "worn \\udfff flash"
    assert "worn \\\\udfff flash" in page.text  # (the JSON on the page escapes the backslash again)


# --- bodies and rate limits, through a real socket ----------------------------------------------------


def raw_request(base_url: str, head: str, body: bytes = b"", timeout_s: float = 5.0) -> tuple[int, float, bytes]:
    """Send ``head`` (and ``body``) on a fresh connection; the status, seconds to the answer, and the answer."""
    url = urlparse(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout_s) as sock:
        started = time.perf_counter()
        sock.sendall(head.encode("latin-1") + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        elapsed = time.perf_counter() - started
    return int(answer.split(b" ", 2)[1]), elapsed, answer


def test_a_100_mb_unauthenticated_enrollment_is_refused_before_its_body_is_read(live_server):
    head = ("POST /api/v1/enroll HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 * 1024 * 1024}\r\n\r\n")  # fmt: skip
    status, elapsed_s, answer = raw_request(live_server, head)  # not one byte of the body is sent
    assert status == 413 and b"over this route's limit" in answer
    assert elapsed_s < 2.0


def test_a_chunked_body_is_cut_off_at_the_route_limit(live_server, settings):
    chunk = b"x" * 4096
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8))  # 32 KiB: over the 16 KiB limit
    head = ("POST /api/v1/enroll HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    status, _, answer = raw_request(live_server, head, chunks)
    assert settings.max_unauthenticated_bytes == 16 * 1024
    assert status == 413, answer[:300]


def test_the_dashboard_login_an_unauthenticated_form_has_the_smallest_body_limit(live_server, settings):
    head = ("POST /ui/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {settings.max_unauthenticated_bytes + 1}\r\n\r\n")  # fmt: skip
    status, elapsed_s, _ = raw_request(live_server, head)  # not one byte of the body is sent
    assert status == 413 and elapsed_s < 2.0


def test_an_oversized_admin_body_is_refused_even_with_a_bogus_key(live_server):
    head = ("POST /api/v1/admin/groups HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer efk_bogus\r\n"
            f"Content-Type: application/json\r\nContent-Length: {50 * 1024 * 1024}\r\n\r\n")  # fmt: skip
    status, elapsed_s, _ = raw_request(live_server, head)
    assert status == 413 and elapsed_s < 2.0


def test_the_enrollment_rate_limit_answers_before_the_body_is_read(live_server, app):
    from fleet_server.ratelimit import RateLimiter

    app.state.enroll_limiter = RateLimiter(2)
    head = ("POST /api/v1/enroll/challenge HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            "Content-Length: 2\r\n\r\n")  # fmt: skip
    assert [raw_request(live_server, head, b"{}")[0] for _ in range(2)] == [200, 200]
    big = ("POST /api/v1/enroll HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           "Content-Length: 10000\r\n\r\n")  # fmt: skip
    status, elapsed_s, answer = raw_request(live_server, big)  # the body never comes: 429 at once
    assert status == 429 and b"retry-after: 60" in answer.lower() and elapsed_s < 2.0


@pytest.mark.parametrize(
    "content_types",
    [("application/json", "text/plain"), ("",), ("application/json\x85",)],
    ids=["repeated", "empty", "trailing-nel"],
)
def test_no_content_type_header_slips_a_json_body_past_the_strict_check(live_server, make_device, admin_headers,
                                                                          session_factory, content_types):  # fmt: skip
    """FastAPI parses a body as JSON by its own reading of the headers (the first Content-Type, ``email``'s
    parsing of it, none or an empty one); the guard must check every body FastAPI will parse."""
    device = make_device()
    body = b'{"capabilities": {"arch": "aarch64", "os": "linux", "extra": "\\udfff"}, "installed": []}'
    lines = "".join(f"Content-Type: {value}\r\n" for value in content_types)
    head = (f"PUT /api/v1/device/inventory HTTP/1.1\r\nHost: t\r\nAuthorization: {device.headers['Authorization']}\r\n"
            f"{lines}Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    status, _, answer = raw_request(live_server, head, body)
    assert status == 400, answer[-300:]
    with session_scope(session_factory) as session:
        assert "extra" not in session.get(Device, device.device_id).capabilities
    assert httpx.get(f"{live_server}/api/v1/admin/devices", headers=admin_headers).status_code == 200


def test_json_nested_2000_deep_is_a_400_on_every_json_route(client, admin_headers, make_device):
    deep = b'{"capabilities": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    device = make_device()
    for method, path, headers in (("PUT", "/api/v1/device/inventory", device.headers),
                                  ("POST", "/api/v1/admin/groups", admin_headers),
                                  ("POST", "/api/v1/enroll", {})):  # fmt: skip
        response = client.request(method, path, content=deep, headers={**headers, "Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert "nested deeper than 32 levels" in response.json()["detail"]


def test_the_agent_drops_a_refused_batch_counts_it_and_keeps_uploading(live_server, make_device, session_factory,
                                                                        tmp_path):  # fmt: skip
    import httpx

    from device_agent.telemetry.buffer import TelemetryBuffer
    from device_agent.telemetry.uploader import TelemetryUploader

    device = make_device()
    buffer = TelemetryBuffer(tmp_path / "telemetry.db", 1_000_000)
    poisoned = {"id": "w", "model": "digits", "version": 3, "start": AT, "end": END, "counters": {"requests": 1e309}}
    buffer.put("window", "window", poisoned)  # what a damaged disk or a bug could leave in the buffer
    buffer.put("event", "error", {"id": "e", "type": "error", "at": AT, "message": "kept"})
    with httpx.Client(base_url=live_server) as http:
        uploader = TelemetryUploader(buffer, http, lambda: device.headers, batch_max_items=1)
        report = uploader.maybe_drain()
    assert report is not None and report.rejected == 1 and uploader.failures == 0
    assert buffer.stats()["items"] == 0
    with session_scope(session_factory) as session:
        events = {e.type: e.payload for e in session.scalars(select(DeviceEvent))}
    assert events["error"]["message"] == "kept" and events["drops"]["dropped"] == {"window:rejected": 1}
    assert stored(session_factory)[1] == 0

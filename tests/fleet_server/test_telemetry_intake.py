"""Telemetry intake: gzip/zstd bodies, exactly-once batches, size limits, basic validation."""

from __future__ import annotations

import gzip
import json
import uuid

import pytest
import zstandard
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from bundles.errors import ConfigError
from fleet_server.api.fast_path import TelemetryFastPath
from fleet_server.db import session_scope
from fleet_server.models import DeviceEvent, MetricWindow, PredictionSample
from fleet_server.services.json_items import parse_object_with_item_texts
from tests.fleet_server.conftest import auth

AT = "2026-11-29T12:00:00+00:00"


def batch(n_samples: int = 3, batch_id: str | None = None) -> dict:
    return {
        "batch_id": batch_id or uuid.uuid4().hex,
        "sent_at": AT,
        "events": [{"id": "e1", "type": "heartbeat", "at": AT, "model": None, "version": None, "uptime_s": 5}],
        "windows": [{"id": "w1", "model": "digits", "version": 3, "start": AT, "end": "2026-11-29T12:01:00+00:00",
                     "counters": {"requests": 60}}],
        "samples": [{"id": f"s{i}", "at": AT, "model": "digits", "version": 3, "capture_reason": "rate",
                     "inclusion_probability": 0.01, "inputs": {}} for i in range(n_samples)],
    }  # fmt: skip


def counts(session_factory) -> tuple[int, int, int]:
    with session_scope(session_factory) as session:
        return tuple(session.scalar(select(func.count()).select_from(t)) for t in (DeviceEvent, MetricWindow,
                                                                                   PredictionSample))  # fmt: skip


def test_gzip_batch_is_stored_and_a_retry_is_not_counted_twice(client, make_device, session_factory):
    device = make_device()
    body = gzip.compress(json.dumps(batch(5)).encode())
    headers = {**device.headers, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    first = client.post("/api/v1/device/telemetry", headers=headers, content=body)
    assert first.json() == {"accepted": {"events": 1, "windows": 1, "samples": 5}, "duplicate": False}
    retry = client.post("/api/v1/device/telemetry", headers=headers, content=body)
    assert retry.status_code == 200 and retry.json()["duplicate"] is True
    assert retry.json()["accepted"] == first.json()["accepted"]
    assert counts(session_factory) == (1, 1, 5)


def test_zstd_batch_is_accepted_and_indexed_columns_are_filled(client, make_device, session_factory):
    device = make_device()
    body = zstandard.ZstdCompressor().compress(json.dumps(batch(2)).encode())
    response = client.post("/api/v1/device/telemetry", headers={**device.headers, "Content-Encoding": "zstd"},
                           content=body)  # fmt: skip
    assert response.status_code == 200, response.text
    with session_scope(session_factory) as session:
        sample = session.scalars(select(PredictionSample)).first()
        assert (sample.device_id, sample.model_name, sample.bundle_version, sample.reason) == (
            device.device_id,
            "digits",
            3,
            "rate",
        )
        assert sample.payload["inclusion_probability"] == 0.01
        window = session.scalars(select(MetricWindow)).first()
        assert window.window_end > window.window_start


def test_the_same_batch_id_from_two_devices_is_two_batches(client, make_device, session_factory):
    shared = batch(1, batch_id="same-id")
    for device in (make_device(), make_device()):
        assert client.post("/api/v1/device/telemetry", headers=device.headers, json=shared).json()["duplicate"] is False
    assert counts(session_factory)[2] == 2


def test_body_over_the_limit_is_413_even_when_it_inflates_from_a_small_gzip(app, client, make_device):
    device = make_device()
    app.state.settings.max_telemetry_bytes = 64 * 1024
    bomb = gzip.compress(b'{"batch_id": "x", "pad": "' + b"a" * 1_000_000 + b'"}')
    assert len(bomb) < 64 * 1024
    response = client.post("/api/v1/device/telemetry", headers={**device.headers, "Content-Encoding": "gzip"},
                           content=bomb)  # fmt: skip
    assert response.status_code == 413
    raw = client.post("/api/v1/device/telemetry", headers=device.headers, content=b"x" * (65 * 1024))
    assert raw.status_code == 413


def test_too_many_items_is_413(app, client, make_device):
    app.state.settings.max_telemetry_items = 10
    response = client.post("/api/v1/device/telemetry", headers=make_device().headers, json=batch(20))
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_malformed_bodies_are_clear_400s_and_store_nothing(client, make_device, session_factory):
    device = make_device()
    bad_item = batch(1)
    bad_item["samples"][0]["at"] = "yesterday"
    cases = [
        (b"{not json", {}),
        (b"[]", {}),
        (json.dumps({"events": []}).encode(), {}),
        (json.dumps({"batch_id": "b", "samples": "nope"}).encode(), {}),
        (json.dumps(bad_item).encode(), {}),
        (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}),
        (b"{}", {"Content-Encoding": "br"}),
        (b"", {}),
    ]
    for body, extra in cases:
        response = client.post("/api/v1/device/telemetry", headers={**device.headers, **extra}, content=body)
        assert response.status_code == 400, (body[:30], response.text)
        assert response.json()["detail"]
    assert counts(session_factory) == (0, 0, 0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=4), max_size=5),
    extra=st.dictionaries(st.text(max_size=5).filter(lambda k: k != "samples"), json_values, max_size=3),
    indent=st.sampled_from([None, 1]),
)
def test_item_texts_decode_to_the_same_items_as_json_loads(items, extra, indent):
    text = json.dumps({**extra, "samples": items}, indent=indent)
    fields, lists = parse_object_with_item_texts(text, ("samples",))
    assert fields == extra
    assert [item for item, _ in lists["samples"]] == items
    assert [json.loads(item_text) for _, item_text in lists["samples"]] == items


@pytest.mark.parametrize("text", ['{"samples": [1, 2', '{"a": 1} x', "[1]", '{"a" 1}', '{"a": 1, "a": 2}', "{1: 2}"])
def test_item_parser_refuses_malformed_json(text):
    with pytest.raises(ConfigError):
        parse_object_with_item_texts(text, ("samples",))


def test_concurrent_retries_of_one_batch_store_it_once(app, make_device, session_factory):
    from concurrent.futures import ThreadPoolExecutor

    from fleet_server.services.telemetry_intake import parse_batch, store_batch

    device = make_device()
    raw = json.dumps(batch(50, batch_id="racing")).encode()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: store_batch(app.state.engine, device.device_id, parse_batch(raw, 1000), 1),
                                range(4)))  # fmt: skip
    assert sorted(r.duplicate for r in results) == [False, True, True, True]
    assert all(r.accepted == {"events": 1, "windows": 1, "samples": 50} for r in results)
    assert counts(session_factory) == (1, 1, 50)


def test_the_upload_fast_path_answers_well_formed_uploads_and_errors_itself_and_declines_odd_headers(
    app, client, make_device
):
    declined: list[str] = []

    async def route(scope, receive, send):  # stands for the router: records what reached it
        declined.append(dict(scope["headers"]).get(b"content-encoding", b"").decode())
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    fast = TelemetryFastPath(route)

    async def served(scope, receive, send):
        scope["app"] = app
        await fast(scope, receive, send)

    device = make_device()
    http = TestClient(served)  # (no lifespan: the app's ran in the client fixture)
    stored = http.post("/api/v1/device/telemetry", headers=device.headers, json=batch(2))
    unknown = http.post("/api/v1/device/telemetry", headers=auth("efd_unknown"), json=batch(1))
    bad = http.post("/api/v1/device/telemetry", headers=device.headers, content=b'{"batch_id": 5}')
    odd = http.post("/api/v1/device/telemetry", headers={**device.headers, "Content-Encoding": "g" * 51},
                    content=b"{}")  # fmt: skip
    assert stored.status_code == 200 and stored.json() == {"accepted": {"events": 1, "windows": 1, "samples": 2},
                                                           "duplicate": False}  # fmt: skip
    assert unknown.status_code == 401 and unknown.headers["www-authenticate"] == "Bearer"
    assert bad.status_code == 400 and bad.json()["detail"].startswith("batch_id")
    assert odd.status_code == 299 and declined == ["g" * 51]
    assert client.post("/api/v1/device/telemetry", headers={**device.headers, "Content-Encoding": "g" * 51},
                       content=b"{}").status_code == 422  # the route itself  # fmt: skip

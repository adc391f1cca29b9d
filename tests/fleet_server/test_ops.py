"""Operations: health, readiness, Prometheus metrics, OpenAPI docs, settings safety."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet_server.settings import Settings


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["schema_revision"] is not None


def test_metrics_count_polls_and_the_304_ratio(app, client, make_device):
    device = make_device()
    etag = client.get("/api/v1/device/desired-state", headers=device.headers).headers["etag"]
    for _ in range(3):
        client.get("/api/v1/device/desired-state", headers={**device.headers, "If-None-Match": etag})
    text = client.get("/metrics").text
    assert 'edgefleet_desired_state_polls_total{result="not_modified"} 3.0' in text
    assert 'route="/api/v1/device/desired-state"' in text and "edgefleet_http_request_duration_seconds" in text
    assert app.state.metrics.not_modified_ratio() == pytest.approx(0.75)
    assert "edgefleet_desired_state_not_modified_ratio 0.75" in text


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/device/desired-state" in paths and "/api/v1/admin/publications" in paths


def test_unknown_routes_and_methods_are_clean_4xx(client):
    assert client.get("/nope").json() == {"detail": "Not Found"}
    assert client.delete("/healthz").status_code == 405


def test_insecure_settings_are_refused_outside_dev_mode(tmp_path, caplog):
    with pytest.raises(ValidationError, match="TOKEN_PEPPER"):
        Settings(mode="production", public_url="https://x.test", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="https"):
        Settings(mode="production", public_url="http://x.test", token_pepper="p" * 32, data_dir=tmp_path)
    assert Settings(mode="dev", data_dir=tmp_path).mode == "dev"
    assert "TOKEN_PEPPER" in caplog.text


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEFLEET_MODE", "production")
    monkeypatch.setenv("EDGEFLEET_TOKEN_PEPPER", "q" * 32)
    monkeypatch.setenv("EDGEFLEET_PUBLIC_URL", "https://fleet.example")
    monkeypatch.setenv("EDGEFLEET_POLL_INTERVAL_S", "120")
    settings = Settings(data_dir=tmp_path)
    assert settings.poll_interval_s == 120 and settings.resolved_database_url.endswith("fleet.db")


def test_logs_are_one_json_object_per_line_with_extra_fields():
    import json
    import logging

    from fleet_server.logs import JsonFormatter

    record = logging.LogRecord("fleet_server.devices", logging.INFO, __file__, 1, "device %s", ("enrolled",), None)
    record.device_id = "dev-1"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "device enrolled" and entry["level"] == "info" and entry["device_id"] == "dev-1"


def test_the_sqlite_database_file_is_created_0600_and_an_open_one_is_tightened(tmp_path):
    import os
    import stat

    from fleet_server.db import make_engine, upgrade_database

    previous = os.umask(0o022)
    try:
        url = f"sqlite:///{tmp_path / 'fleet.db'}"
        upgrade_database(url)
        assert stat.S_IMODE((tmp_path / "fleet.db").stat().st_mode) == 0o600
        (tmp_path / "fleet.db").chmod(0o644)  # as a file made by an older server
        make_engine(url).dispose()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "fleet.db").stat().st_mode) == 0o600

"""``edgefleet-server drift`` and ``edgefleet-server telemetry ...`` on an initialised data directory."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bundles.testing import build_bundle_dir
from fleet_server.cli import app
from fleet_server.db import make_engine, make_session_factory, session_scope
from fleet_server.models import BundleRecord
from fleet_server.services.telemetry_intake import parse_batch, store_batch
from fleet_server.settings import load_settings
from tests.fleet_server.telemetry.helpers import simulate, uniform

runner = CliRunner()
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def cli(data_dir, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir)])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def server_with_drift(tmp_path, monkeypatch):
    """A SQLite server data dir holding tiny@1 and 20 minutes of a device's windows with f0 shifted."""
    for name in ("EDGEFLEET_MODE", "EDGEFLEET_TOKEN_PEPPER", "EDGEFLEET_PUBLIC_URL", "EDGEFLEET_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    data_dir = tmp_path / "srv"
    cli(data_dir, "init", "--public-url", "https://fleet.example")
    manifest = build_bundle_dir(tmp_path / "tiny-1", name="tiny", version=1)
    buffer = simulate(tmp_path / "tiny-1", tmp_path, uniform(1200, 7, {0: 1.5}), NOW - dt.timedelta(minutes=20),
                      sample_rate=0.05)  # fmt: skip
    engine = make_engine(load_settings(data_dir).resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        session.add(BundleRecord(name="tiny", version=1, manifest=manifest.to_dict(),
                                 manifest_target="tiny/1/manifest.json", variants=[]))  # fmt: skip
    batch = buffer.next_batch(max_items=10_000, max_bytes=10**9)
    store_batch(engine, "dev-1", parse_batch(json.dumps(batch.to_dict()).encode(), 10_000), 0)
    engine.dispose()
    return data_dir


def test_drift_shows_psi_per_feature_and_output_and_records_alerts(server_with_drift):
    data_dir = server_with_drift
    report = json.loads(cli(data_dir, "drift", "tiny", "--json"))
    (version,) = report["versions"]
    assert version["version"] == 1 and version["rows"] == 1200
    assert version["psi"]["f0"] > 0.25 and version["levels"]["f0"] == "alert"
    assert "output:label" in version["psi"] and report["alerts"] == []

    table = cli(data_dir, "drift", "tiny", "--evaluate")
    assert "tiny@1" in table and "alert" in table and "f0" in table
    alerts = json.loads(cli(data_dir, "telemetry", "alerts", "--json"))
    assert "f0" in {a["feature"] for a in alerts}


def test_monitor_overrides_and_one_line_errors(server_with_drift):
    data_dir = server_with_drift
    shown = json.loads(cli(data_dir, "telemetry", "monitor", "tiny"))
    assert (shown["warn_psi"], shown["alert_psi"], shown["overridden"]) == (0.1, 0.25, False)
    override = ("--warn", "0.2", "--alert", "40", "--lookback", "2h")
    changed = json.loads(cli(data_dir, "telemetry", "monitor", "tiny", *override))
    assert (changed["warn_psi"], changed["alert_psi"], changed["lookback_s"]) == (0.2, 40.0, 7200)
    assert json.loads(cli(data_dir, "drift", "tiny", "--json"))["versions"][0]["levels"]["f0"] == "warn"
    error = cli(data_dir, "telemetry", "monitor", "tiny", "--warn", "0.5", "--alert", "0.3", code=1)
    assert error.strip().startswith("error:") and len(error.strip().splitlines()) == 1


def test_summary_export_and_prune(server_with_drift, tmp_path):
    data_dir = server_with_drift
    (row,) = json.loads(cli(data_dir, "telemetry", "summary", "tiny", "--json"))
    assert row["requests"] == 1200 and row["latency_p95_ms"] is not None
    out = tmp_path / "samples.parquet"
    assert "samples written" in cli(data_dir, "telemetry", "export-samples", str(out), "--model", "tiny")
    table = pq.read_table(out)
    assert table.num_rows > 0 and set(table.column("reason").to_pylist()) == {"rate"}
    assert json.loads(cli(data_dir, "telemetry", "prune")) == {
        "metric_windows": 0,
        "prediction_samples": 0,
        "device_events": 0,
    }

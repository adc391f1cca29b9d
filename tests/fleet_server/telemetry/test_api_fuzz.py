"""Property-based fuzzing of the telemetry and drift operations in the app's OpenAPI: no input gives a 5xx."""

from __future__ import annotations

import datetime as dt

import schemathesis

from tests.fleet_server.telemetry.helpers import simulate, uniform, upload
from tests.fleet_server.test_api_fuzz import fuzz


def telemetry_operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    for result in schema.get_all_operations():
        operation = result.ok()
        if "telemetry" in operation.definition.raw.get("tags", []):
            yield operation


def test_no_telemetry_operation_answers_a_server_error(app, client, release, make_device, admin_headers, tmp_path):
    release.publish("tiny", 1)  # real rows to read, so generated queries reach the aggregation code
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    upload(simulate(release.work_dir / "tiny-1", tmp_path, uniform(120, 1), start, sample_rate=0.1), client,
           make_device().headers)  # fmt: skip
    operations = list(telemetry_operations(app))
    assert len(operations) >= 9
    statuses: list[int] = []
    errors = []
    for operation in operations:
        errors += fuzz(operation, admin_headers, statuses)
    assert errors == []
    assert sum(200 <= s < 300 for s in statuses) >= len(operations)  # generated input did reach the handlers

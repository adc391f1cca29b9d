"""Property-based fuzzing of the telemetry and drift operations in the app's OpenAPI: no input gives a 5xx."""

from __future__ import annotations

import datetime as dt

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.fleet_server.telemetry.helpers import simulate, uniform, upload

MAX_EXAMPLES_PER_OPERATION = 10


def telemetry_operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    for result in schema.get_all_operations():
        operation = result.ok()
        if "telemetry" in operation.definition.raw.get("tags", []):
            yield operation


def fuzz(operation, headers: dict[str, str], statuses: list[int]) -> list[str]:
    """The bounded property test of one operation; returns the server errors seen."""
    errors: list[str] = []
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(case):
        response = case.call(headers={**(case.headers or {}), **headers})
        statuses.append(response.status_code)
        if response.status_code >= 500:
            errors.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

    run()
    return errors


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

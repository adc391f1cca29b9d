"""Property-based fuzzing of the core operations in the app's own OpenAPI schema: no input gives a 5xx.

Schemathesis derives a Hypothesis strategy per operation; each example is drawn from valid
(positive) or invalid (negative) data for bodies, parameters and headers, bounded by
``MAX_EXAMPLES_PER_OPERATION`` to keep the suite fast. Device endpoints are called with a real
device token and the rest with an admin key, so generated input reaches the handlers instead of
stopping at authentication. The operations of ``fleet_server.telemetry`` and ``fleet_server.rollouts``
(tags ``telemetry`` and ``rollouts``) are left to those packages' own tests.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

MAX_EXAMPLES_PER_OPERATION = 10
OTHER_PACKAGES_TAGS = {"telemetry", "rollouts"}


def core_operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    for result in schema.get_all_operations():
        operation = result.ok()
        if not OTHER_PACKAGES_TAGS & set(operation.definition.raw.get("tags", [])):
            yield operation


def fuzz(operation, headers: dict[str, str]) -> list[str]:
    """Run the bounded property test for one operation; returns the server errors seen."""
    errors: list[str] = []
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(case):
        response = case.call(headers={**(case.headers or {}), **headers})
        if response.status_code >= 500:
            errors.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

    run()
    return errors


def test_no_core_operation_answers_a_server_error(app, make_device, admin_headers):
    device = make_device()
    operations = list(core_operations(app))
    assert len(operations) >= 30
    errors = []
    for operation in operations:
        headers = device.headers if operation.path.startswith("/api/v1/device") else admin_headers
        errors += fuzz(operation, headers)
    assert errors == []
    assert served_requests(app) >= 3 * len(operations)  # the examples really reached the app


def served_requests(app) -> float:
    samples = app.state.metrics.request_latency_s.collect()[0].samples
    return sum(s.value for s in samples if s.name.endswith("_count"))

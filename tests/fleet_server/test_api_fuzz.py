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


def fuzz(operation, headers: dict[str, str], statuses: list[int]) -> list[str]:
    """Run the bounded property test for one operation; returns the server errors seen."""
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


def test_no_core_operation_answers_a_server_error(app, make_device, make_api_key):
    operations = list(core_operations(app))
    assert len(operations) >= 30
    errors: list[str] = []
    statuses: list[int] = []
    for operation in operations:  # fresh credentials: an earlier operation may have revoked the last ones
        device_op = operation.path.startswith("/api/v1/device")
        headers = make_device().headers if device_op else {"Authorization": f"Bearer {make_api_key('admin')}"}
        errors += fuzz(operation, headers, statuses)
    assert errors == []
    assert served_requests(app) >= 3 * len(operations)  # the examples really reached the app
    past_auth = [code for code in statuses if code not in (401, 403)]
    assert len(past_auth) >= 0.7 * len(statuses)  # and mostly got past authentication to the handlers
    assert any(200 <= code < 300 for code in statuses) and any(code in (400, 404, 409, 422) for code in statuses)


def served_requests(app) -> float:
    samples = app.state.metrics.request_latency_s.collect()[0].samples
    return sum(s.value for s in samples if s.name.endswith("_count"))

"""Schemathesis with every check over the admin and device APIs: the server answers what its schema says.

Each operation of the published OpenAPI schema (device, admin, bundles, telemetry, rollouts,
operations) gets a few generated requests, valid and invalid (``MAX_EXAMPLES``), sent to the real app
with real credentials (an accepted device's token on device routes, an admin key elsewhere), and
every response is validated with all of schemathesis' checks: no 5xx, status codes, content types,
headers and bodies that match the schema (error bodies included), invalid data refused, valid data
accepted. Failures are collected per operation and check, and listed together.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import load_all_checks
from schemathesis.core.failures import FailureGroup

MAX_EXAMPLES = 6
SKIPPED_PATHS = {"/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json"}


def all_checks() -> list:
    from schemathesis.checks import CHECKS

    load_all_checks()
    return list(CHECKS.get_all())


def run_operation(operation, headers: dict[str, str], statuses: list[int], checks: list) -> list[str]:
    failures: list[str] = []
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(case):
        sent = {**(case.headers or {}), **headers}
        response = case.call(headers=sent)
        statuses.append(response.status_code)
        try:
            case.validate_response(response, checks=checks, headers=sent)
        except (Exception, FailureGroup) as failure:  # one (grouped) failure per response
            failures.append(f"{case.method} {case.formatted_path} -> {response.status_code} {response.text[:200]}:"
                            f" {str(failure)[:300]}")  # fmt: skip

    run()
    return failures


def configured(schema):
    """The two checks whose expectations this API states differently from schemathesis' defaults.

    A schema-valid request may still be refused with a 400 naming the field when it breaks a rule no
    JSON Schema can state (the filter language, gate expressions, ``NAME@VERSION`` references, a
    telemetry batch's items) or with a 413 when it is over its route's byte limit; a schema-violating
    request may be refused with that 413 before it is parsed at all. Everything else is the default.
    """
    checks = schema.config.checks
    checks.positive_data_acceptance.expected_statuses = [*checks.positive_data_acceptance.expected_statuses,
                                                          "400", "413"]  # fmt: skip
    checks.negative_data_rejection.expected_statuses = [*checks.negative_data_rejection.expected_statuses, "413"]
    return schema


def test_every_admin_and_device_operation_passes_every_schemathesis_check(app, make_device, make_api_key):
    schema = configured(schemathesis.openapi.from_asgi("/openapi.json", app))
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if op.path not in SKIPPED_PATHS]
    assert len(operations) >= 55
    checks, statuses, failures = all_checks(), [], []
    for operation in operations:  # fresh credentials: an earlier operation may have revoked the last ones
        device_op = operation.path.startswith("/api/v1/device")
        headers = make_device().headers if device_op else {"Authorization": f"Bearer {make_api_key('admin')}"}
        failures += run_operation(operation, headers, statuses, checks)
    assert failures == [], "\n".join(failures)
    assert not [s for s in statuses if s >= 500]
    assert len(statuses) >= 3 * len(operations)

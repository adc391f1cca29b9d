"""schemathesis over the endpoint's published OpenAPI: no generated request gets a 500."""

from __future__ import annotations

import schemathesis

from tests.fleet_server.inference.conftest import Served
from tests.fleet_server.test_api_fuzz import fuzz


def test_no_inference_operation_answers_a_server_error(endpoint: Served) -> None:
    schema = schemathesis.openapi.from_url(f"{endpoint.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    errors: list[str] = []
    statuses: list[int] = []
    for operation in operations:
        errors += fuzz(operation, {"Authorization": f"Bearer {endpoint.fleet.admin_key}"}, statuses)
    assert errors == []
    assert any(200 <= code < 300 for code in statuses) and any(code in (400, 404) for code in statuses)

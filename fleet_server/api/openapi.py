"""The published OpenAPI schema, made to say what the server enforces.

FastAPI derives the schema from the pydantic models, which leaves out what the request guard and the
error mapping do (``fleet_server.api.guard``, ``fleet_server.errors``). :func:`publish` adds it, so that
a client generated from the schema (or a fuzzer such as schemathesis) meets no surprise:

- every operation lists its error statuses with the ``{"detail": ...}`` body (``errors.document_errors``);
- in request and response bodies, free-form JSON values (``Any``) are described as the guard accepts
  them (64-bit integers, finite numbers, strings of at most ``MAX_TEXT_CHARS`` characters), and every
  integer without bounds is bounded to 64 bits, every string without a limit to ``MAX_TEXT_CHARS``:
  the limits the guard enforces on every JSON body. (Path and query parameters keep the limits their
  routes declare and enforce.)
"""

from __future__ import annotations

from typing import Any

from fleet_server.errors import document_errors
from fleet_server.services.json_guard import INT64_MAX, INT64_MIN, MAX_TEXT_CHARS

JSON_VALUE = "JsonValue"
JSON_VALUE_SCHEMA: dict[str, Any] = {
    "description": "any JSON value the server accepts: 64-bit integers, finite numbers, bounded strings",
    "anyOf": [
        {"type": "string", "maxLength": MAX_TEXT_CHARS},
        {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
        {"type": "number", "minimum": -1e300, "maximum": 1e300},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": f"#/components/schemas/{JSON_VALUE}"}, "maxItems": 100},
        {"type": "object", "additionalProperties": {"$ref": f"#/components/schemas/{JSON_VALUE}"},
         "maxProperties": 100},
    ],
}  # fmt: skip
REF = {"$ref": f"#/components/schemas/{JSON_VALUE}"}


def publish(schema: dict[str, Any]) -> dict[str, Any]:
    """Complete FastAPI's schema (in place) with errors and bounds; idempotent."""
    document_errors(schema)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, node in list(components.items()):
        if name != JSON_VALUE:
            _bound(node)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            _bound(operation.get("requestBody", {}))
    components[JSON_VALUE] = JSON_VALUE_SCHEMA
    return schema


def _bound(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _bound(item)
        return
    if not isinstance(node, dict):
        return
    for key, value in list(node.items()):
        if key in ("properties", "$defs"):
            for name, sub in list(value.items()):
                value[name] = REF if sub == {} else sub
                _bound(value[name])
        elif key in ("items", "additionalProperties", "schema") and value in ({}, True):
            node[key] = REF
        elif isinstance(value, (dict, list)):
            _bound(value)
    kind = node.get("type")
    if kind == "integer":
        node.setdefault("minimum", INT64_MIN)
        node.setdefault("maximum", INT64_MAX)
    elif kind == "string" and "format" not in node and "enum" not in node:
        node.setdefault("maxLength", MAX_TEXT_CHARS)

"""A small device filter language: field comparisons joined by ``and``.

    hw=pi4 and runtime=onnxruntime>=1.20 and memory_mb>=512 and tag=canary

Fields: ``id``, ``fleet``, ``status``, ``hw``, ``arch``, ``os``, ``python``, ``agent`` (agent version),
``memory_mb``, ``disk_free_mb``, ``tag``, ``group``, ``accelerator`` and ``runtime``. Operators:
``= != >= <= > <``. Numbers compare as numbers, versions (``python``, ``agent``) as dotted versions,
the rest as lowercase strings. ``runtime=NAME`` means the runtime is installed, and
``runtime=NAME>=1.20`` (any operator) also compares its version. ``tag``, ``group`` and
``accelerator`` match when any of the device's values matches.

Equality on indexed columns (``fleet``, ``status``, ``hw``, ``arch``) is pushed into SQL; every clause
is then checked in Python on the candidates, so the SQL part is only an optimisation.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bundles.errors import ConfigError
from bundles.selection import version_tuple

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
    ">": operator.gt, "<": operator.lt,
}  # fmt: skip
STRING_FIELDS = {"id": "id", "fleet": "fleet", "status": "status", "hw": "hw_class", "arch": "arch", "os": "os"}
VERSION_FIELDS = {"python": "python", "agent": "agent_version"}
NUMBER_FIELDS = {"memory_mb": "memory_mb", "disk_free_mb": "disk_free_mb"}
SET_FIELDS = {"tag": "tags", "group": "groups", "accelerator": "accelerators"}
SQL_PUSHABLE = {"fleet", "status", "hw", "arch"}

_CLAUSE_RE = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|!=|==|=|>|<)\s*(\S.*?)\s*$")
_RUNTIME_RE = re.compile(r"^([A-Za-z0-9_.-]+?)\s*(?:(>=|<=|!=|==|=|>|<)\s*([0-9][0-9A-Za-z.+-]*))?$")
_AND_RE = re.compile(r"(?:^|\s+)and(?:\s+|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Clause:
    """One comparison: ``field op value`` (for runtimes, ``value`` is the runtime name)."""

    field: str
    op: str
    value: str
    runtime_op: str | None = None
    runtime_version: str | None = None


def parse_filter(expression: str) -> list[Clause]:
    """The clauses of ``expression``; a :class:`ConfigError` naming the clause that does not parse."""
    if not expression.strip():
        return []
    parts = _AND_RE.split(expression.strip())
    if any(not part.strip() for part in parts):
        raise ConfigError(f"filter {expression!r}: 'and' needs a comparison on both sides")
    return [_parse_clause(part) for part in parts]


def _parse_clause(text: str) -> Clause:
    match = _CLAUSE_RE.match(text)
    if match is None:
        raise ConfigError(f"filter clause {text!r} is not 'field<op>value' (ops: = != >= <= > <)")
    field, op, value = match.groups()
    known = STRING_FIELDS.keys() | VERSION_FIELDS.keys() | NUMBER_FIELDS.keys() | SET_FIELDS.keys() | {"runtime"}
    if field not in known:
        raise ConfigError(f"filter field {field!r} is unknown (known: {', '.join(sorted(known))})")
    if field == "runtime":
        return _runtime_clause(op, value)
    if field in NUMBER_FIELDS and not re.fullmatch(r"-?\d+", value):
        raise ConfigError(f"filter clause {text!r}: {field} needs a whole number")
    if field in SET_FIELDS and op not in ("=", "==", "!="):
        raise ConfigError(f"filter clause {text!r}: {field} supports only = and !=")
    return Clause(field=field, op=op, value=value)


def _runtime_clause(op: str, value: str) -> Clause:
    match = _RUNTIME_RE.match(value)
    if match is None or op not in ("=", "==", "!="):
        raise ConfigError(f"runtime clause 'runtime{op}{value}' is not 'runtime=NAME' or 'runtime=NAME>=VERSION'")
    name, runtime_op, runtime_version = match.groups()
    return Clause(field="runtime", op=op, value=name.lower(), runtime_op=runtime_op, runtime_version=runtime_version)


def sql_equalities(clauses: list[Clause]) -> dict[str, str]:
    """Column -> value for the clauses that can narrow the SQL query (plain equality on indexed columns)."""
    return {STRING_FIELDS[c.field]: c.value.lower() for c in clauses if c.field in SQL_PUSHABLE and c.op in ("=", "==")}


def matches(clauses: list[Clause], device: dict[str, Any]) -> bool:
    """Whether a device (``describe_device`` with tags and groups) satisfies every clause."""
    return all(_matches(clause, device) for clause in clauses)


def _matches(clause: Clause, device: dict[str, Any]) -> bool:
    compare = OPERATORS[clause.op]
    if clause.field == "runtime":
        return _runtime_matches(clause, device)
    if clause.field in SET_FIELDS:
        values = _set_values(clause.field, device)
        return (clause.value.lower() in values) == (clause.op != "!=")
    if clause.field in NUMBER_FIELDS:
        actual = device.get(NUMBER_FIELDS[clause.field])
        return actual is not None and compare(int(actual), int(clause.value))
    if clause.field in VERSION_FIELDS:
        actual = device.get(VERSION_FIELDS[clause.field])
        return bool(actual) and compare(*_versions(str(actual), clause.value))
    actual = device.get(STRING_FIELDS[clause.field])
    return compare(str(actual or "").lower(), clause.value.lower())


def _set_values(field: str, device: dict[str, Any]) -> set[str]:
    if field == "accelerator":
        return {str(a).lower() for a in (device.get("capabilities") or {}).get("accelerators") or ()}
    return {str(v).lower() for v in device.get(SET_FIELDS[field]) or ()}


def _runtime_matches(clause: Clause, device: dict[str, Any]) -> bool:
    runtimes = {str(k).lower(): str(v) for k, v in ((device.get("capabilities") or {}).get("runtimes") or {}).items()}
    installed = clause.value in runtimes
    if installed and clause.runtime_op is not None and clause.runtime_version is not None:
        compare = OPERATORS[clause.runtime_op]
        installed = compare(*_versions(runtimes[clause.value], clause.runtime_version))
    return installed == (clause.op != "!=")


def _versions(left: str, right: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Both versions as tuples padded to one width, so that ``1.20`` equals ``1.20.0``."""
    a, b = version_tuple(left), version_tuple(right)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)), b + (0,) * (width - len(b))

"""The typed contract: total on any JSON, a round trip for every model, the same bounds at both ends."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bundles import contract
from bundles.contract import (
    DesiredState,
    FallbackSection,
    Heartbeat,
    InstallEvent,
    Inventory,
    SavedDesiredState,
    SlotMarker,
    SlotPointer,
    parse,
    parse_json,
    to_dict,
)
from bundles.errors import ContractError

MODELS = [getattr(contract, name) for name in contract.__all__ if dataclasses.is_dataclass(getattr(contract, name))]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
DESIRED = {
    "device_id": "dev-1", "poll_interval_s": 60, "jitter_s": 5,
    "models": [{"name": "digits", "version": 3, "manifest_target": "digits/3/manifest.json", "variant": None,
                "rollout_id": 7, "shadow": {"version": 4, "manifest_target": "digits/4/manifest.json"},
                "start_after": None}],
    "fallback": {"url": "https://cloud.example/v2", "model": "digits"},
    "telemetry": {"window_s": 60, "sample_rate": 0.01, "reservoir_size": 20, "upload_interval_s": 60},
}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(data=json_values, kind=st.sampled_from(MODELS))
def test_parse_is_total_it_returns_a_model_or_raises_a_contract_error(data: Any, kind: type) -> None:
    try:
        parsed = parse(kind, data)
    except ContractError:
        return
    assert isinstance(parsed, kind)
    assert parse(kind, to_dict(parsed)) == parsed  # what was accepted survives its own serialisation


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_parse_json_of_any_bytes_never_raises_anything_else(raw: bytes) -> None:
    try:
        parse_json(SavedDesiredState, raw)
    except ContractError:
        pass


def test_a_desired_state_round_trips_and_keeps_its_types() -> None:
    state = parse(DesiredState, DESIRED)
    assert state.models[0].shadow is not None and state.models[0].shadow.version == 4
    assert state.fallback is not None and state.fallback.url == "https://cloud.example/v2"
    assert parse(DesiredState, to_dict(state)) == state


def test_an_old_servers_desired_state_without_a_fallback_still_parses() -> None:
    """The announced endpoint is optional: a server that names none leaves the device to its default."""
    old = {key: value for key, value in DESIRED.items() if key != "fallback"}
    assert parse(DesiredState, old).fallback is None
    assert parse(DesiredState, {**DESIRED, "fallback": {"url": None}}).fallback == FallbackSection()


@pytest.mark.parametrize(
    ("kind", "data", "field"),
    [
        (DesiredState, {**DESIRED, "models": [{**DESIRED["models"][0], "version": "3"}]}, "models[0].version"),
        (DesiredState, {**DESIRED, "models": [{**DESIRED["models"][0], "version": True}]}, "models[0].version"),
        (DesiredState, {**DESIRED, "poll_interval_s": float("nan")}, "poll_interval_s"),
        (DesiredState, {**DESIRED, "telemetry": {"sample_rate": 3}}, "sample_rate"),
        (SlotPointer, {"active": "c"}, "active"),
        (SlotMarker, {"slot": "a", "name": "m", "version": 1, "variant": "v", "manifest_sha256": "xyz"}, "sha256"),
        (Inventory, {"capabilities": {}, "installed": [{"name": "x" * 101, "version": 1}]}, "installed[0].name"),
        (Heartbeat, {"id": "1", "at": "now", "uptime_s": -1}, "uptime_s"),
        (InstallEvent, {"id": "1", "at": "now", "model": "m", "version": 1, "result": "maybe"}, "result"),
    ],
)
def test_a_bad_field_is_refused_with_its_path(kind: type, data: Any, field: str) -> None:
    with pytest.raises(ContractError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse(kind, data)


def test_the_server_side_pydantic_build_enforces_the_same_bounds() -> None:
    """FastAPI builds the contract's dataclasses through pydantic: the field limits hold there too."""
    pydantic = pytest.importorskip("pydantic", reason="server side: pydantic is not installed on a device")
    TypeAdapter, ValidationError = pydantic.TypeAdapter, pydantic.ValidationError  # noqa: N806

    adapter = TypeAdapter(Inventory)
    good = {"capabilities": {"arch": "x86_64"}, "installed": [{"name": "digits", "version": 3, "state": "active"}]}
    assert adapter.validate_python(good) == parse(Inventory, good)
    for bad in ({**good, "installed": [{"name": "x" * 101, "version": 1}]},
                {**good, "installed": [{"name": "d", "version": -1}]},
                {**good, "agent_version": "v" * 33}):  # fmt: skip
        with pytest.raises(ContractError):
            parse(Inventory, bad)
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


_SCHEMA_KEYS = {"max_length": ("maxLength", "maxItems", "maxProperties"), "min_length": ("minLength", "minItems"),
                "pattern": ("pattern",), "ge": ("minimum",), "le": ("maximum",)}  # fmt: skip


def _schema_bounds(prop: dict[str, Any]) -> set[str]:
    """The JSON-schema bound keywords of a property, looking inside ``anyOf`` (optional fields)."""
    found = set(prop)
    for choice in prop.get("anyOf", []):
        found |= set(choice)
    return found


@pytest.mark.parametrize("kind", MODELS, ids=lambda kind: kind.__name__)
def test_the_published_schema_carries_every_bound_the_contract_enforces(kind: type) -> None:
    """A client generating requests from the server's OpenAPI schema must never meet a hidden bound."""
    pydantic = pytest.importorskip("pydantic", reason="server side: pydantic is not installed on a device")
    schema = pydantic.TypeAdapter(kind).json_schema(mode="validation")
    props = schema.get("properties") or schema["$defs"][kind.__name__]["properties"]
    for f in dataclasses.fields(kind):
        present = _schema_bounds(props[f.name])
        for key in f.metadata:
            assert present & set(_SCHEMA_KEYS[key]), f"{kind.__name__}.{f.name}: {key} is not in the schema"

"""The typed contract between the fleet server and the device, and of every file the agent persists.

Wire messages (the desired state, the inventory, the heartbeat and install/repair events) and the
agent's state files (slot pointer and marker, failed targets, last update, saved desired state,
enrollment) are frozen dataclasses here. Both ends validate with the same code:

* :func:`parse` turns decoded JSON into a model, checking every field against its type hint
  (strings, integers that are not booleans, finite floats, literals, optionals, lists, string-keyed
  maps, nested models) and the limits in the field's metadata (:func:`limits`). It is *total*: any
  input either becomes a model or raises :class:`~bundles.errors.ContractError` naming the field;
  it never raises anything else. Unknown keys are ignored, so an older reader accepts a newer writer.
* ``__post_init__`` (via :class:`Checked`) re-applies the limits when a model is built directly; the
  limits are stored under pydantic's ``Field`` keywords, so the server's FastAPI/pydantic layer, which
  builds these dataclasses from their type hints, enforces the same bounds and publishes them in its
  OpenAPI schema.
* :func:`to_dict` is the inverse (``None`` fields kept, so the bytes are stable).

``CONTRACT_VERSION`` is sent by the agent (``User-Agent`` and inventory) so a server can tell which
shape a device speaks; additions are backward compatible, removals need a new version.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

from bundles import jsonio
from bundles.errors import ContractError

CONTRACT_VERSION = 1
T = TypeVar("T")

MAX_TEXT = 4096
"""Default bound of every string field (a field's metadata may set a smaller or larger one)."""
MAX_ITEMS = 1000
"""Default bound of every list and map."""
MAX_INT = 2**63 - 1
_SHA256 = r"^[0-9a-f]{64}$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def limits(
    *,
    max_len: int | None = None,
    min_len: int = 0,
    pattern: str | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> dict[str, Any]:
    """Field metadata bounding a value: ``field(metadata=limits(max_len=100, ge=0))``.

    The keys are pydantic's ``Field`` keywords (``max_length``, ``min_length``, ``pattern``, ``ge``,
    ``le``), and only the bounds actually set are present: pydantic builds a stdlib dataclass field as
    ``Field(**field.metadata)``, so the server's request validation and its OpenAPI schema carry exactly
    these bounds, and a client generating requests from the schema never meets a hidden one.
    """
    given = {"max_length": max_len, "min_length": min_len or None, "pattern": pattern, "ge": ge, "le": le}
    return {key: value for key, value in given.items() if value is not None}


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


# --- the validator ---------------------------------------------------------------------------------


def parse(kind: Any, data: Any, where: str | None = None) -> Any:
    """``data`` (decoded JSON) checked against ``kind`` (a model class or a type such as ``dict[str, str]``).

    Raises:
        ContractError: the data does not fit, with the path of the first bad field.
    """
    try:
        return _value(kind, data, where or _name(kind), {})
    except ContractError:
        raise
    except (TypeError, ValueError, RecursionError) as e:  # a constructor refused: still a contract error
        raise ContractError(f"{where or _name(kind)}: {e}") from e


def parse_json(kind: type[T], raw: bytes | str, where: str | None = None) -> T:
    """Decode JSON bytes and :func:`parse` them (bad JSON is a :class:`ContractError` too)."""
    try:
        data = jsonio.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ContractError(f"{where or _name(kind)}: not valid JSON ({e})") from e
    result: T = parse(kind, data, where)
    return result


def to_dict(model: Any) -> Any:
    """A model (or a structure of models) as plain JSON-ready data."""
    if dataclasses.is_dataclass(model) and not isinstance(model, type):
        return {f.name: to_dict(getattr(model, f.name)) for f in dataclasses.fields(model)}
    if isinstance(model, enum.Enum):
        return model.value
    if isinstance(model, (list, tuple)):
        return [to_dict(v) for v in model]
    if isinstance(model, Mapping):
        return {str(k): to_dict(v) for k, v in model.items()}
    return model


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def _value(kind: Any, data: Any, where: str, meta: Mapping[str, Any]) -> Any:
    if kind is Any or kind is object:
        return _json_like(data, where, 0)
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return _union(typing.get_args(kind), data, where, meta)
    if origin is Literal:
        if data not in typing.get_args(kind) or isinstance(data, bool) != any(
            isinstance(a, bool) for a in typing.get_args(kind)
        ):
            allowed = ", ".join(repr(a) for a in typing.get_args(kind))
            raise ContractError(f"{where}: expected one of {allowed}, got {_show(data)}")
        return data
    if origin in (list, tuple):
        return _sequence(kind, data, where, meta)
    if origin in (dict, Mapping):
        return _mapping(kind, data, where, meta)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _model(kind, data, where)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(data)
        except ValueError:
            raise ContractError(f"{where}: {_show(data)} is not one of {[m.value for m in kind]}") from None
    return _scalar(kind, data, where, meta)


def _union(options: tuple[Any, ...], data: Any, where: str, meta: Mapping[str, Any]) -> Any:
    if data is None:
        if type(None) in options:
            return None
        raise ContractError(f"{where}: required, got null")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _value(option, data, where, meta)
        except ContractError as e:
            errors.append(str(e))
    raise ContractError(errors[0] if len(errors) == 1 else f"{where}: {_show(data)} fits none of the allowed types")


def _sequence(kind: Any, data: Any, where: str, meta: Mapping[str, Any]) -> Any:
    if not isinstance(data, (list, tuple)):
        raise ContractError(f"{where}: expected a list, got {_show(data)}")
    _check_size(len(data), where, meta)
    args = typing.get_args(kind)
    item = args[0] if args else Any
    items = [_value(item, v, f"{where}[{i}]", {}) for i, v in enumerate(data)]
    return tuple(items) if typing.get_origin(kind) is tuple else items


def _mapping(kind: Any, data: Any, where: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ContractError(f"{where}: expected an object, got {_show(data)}")
    _check_size(len(data), where, meta)
    args = typing.get_args(kind)
    item = args[1] if len(args) == 2 else Any
    out = {}
    for key, value in data.items():
        if not isinstance(key, str) or len(key) > MAX_TEXT:
            raise ContractError(f"{where}: keys must be strings of at most {MAX_TEXT} characters")
        out[key] = _value(item, value, f"{where}.{key}", {})
    return out


def _check_size(size: int, where: str, meta: Mapping[str, Any]) -> None:
    bound = meta.get("max_length") or MAX_ITEMS
    if size > bound:
        raise ContractError(f"{where}: at most {bound} items, got {size}")


def _model(kind: type[T], data: Any, where: str) -> T:
    if isinstance(data, kind):
        return data
    if not isinstance(data, Mapping):
        raise ContractError(f"{where}: expected an object, got {_show(data)}")
    hints = _hints(kind)
    values = {}
    for f in dataclasses.fields(kind):  # type: ignore[arg-type]
        if not f.init:
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ContractError(f"{where}: missing required field '{f.name}'")
            continue
        values[f.name] = _value(hints[f.name], data[f.name], f"{where}.{f.name}", f.metadata)
    return kind(**values)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(kind: type) -> dict[str, Any]:
    found = _HINTS.get(kind)
    if found is None:  # each base's annotations are resolved in its own module
        found = _HINTS[kind] = typing.get_type_hints(kind)
    return found


def _scalar(kind: Any, data: Any, where: str, meta: Mapping[str, Any]) -> Any:
    if kind is bool:
        if not isinstance(data, bool):
            raise ContractError(f"{where}: expected true or false, got {_show(data)}")
        return data
    if kind is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ContractError(f"{where}: expected an integer, got {_show(data)}")
        _check_number(data, where, meta)
        return data
    if kind is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ContractError(f"{where}: expected a number, got {_show(data)}")
        if not math.isfinite(data):
            raise ContractError(f"{where}: expected a finite number, got {data}")
        _check_number(data, where, meta)
        return float(data)
    if kind is str:
        if not isinstance(data, str):
            raise ContractError(f"{where}: expected a string, got {_show(data)}")
        _check_text(data, where, meta)
        return data
    raise ContractError(f"{where}: the contract has no rule for {kind!r}")


def _check_number(value: float, where: str, meta: Mapping[str, Any]) -> None:
    ge, le = meta.get("ge"), meta.get("le")
    if ge is not None and value < ge:
        raise ContractError(f"{where}: must be at least {ge}, got {value}")
    if le is not None and value > le:
        raise ContractError(f"{where}: must be at most {le}, got {value}")
    if abs(value) > MAX_INT:
        raise ContractError(f"{where}: {value} is out of range")


def _check_text(value: str, where: str, meta: Mapping[str, Any]) -> None:
    bound = meta.get("max_length") or MAX_TEXT
    if not meta.get("min_length", 0) <= len(value) <= bound:
        raise ContractError(f"{where}: expected {meta.get('min_length', 0)} to {bound} characters, got {len(value)}")
    pattern = meta.get("pattern")
    if pattern is not None and not _compiled(pattern).match(value):
        raise ContractError(f"{where}: {_show(value)} does not match {pattern}")
    if "\x00" in value:
        raise ContractError(f"{where}: NUL characters are not allowed")


def _json_like(data: Any, where: str, depth: int) -> Any:
    """``Any`` fields still hold plain JSON of bounded depth and size (no NaN, no huge strings)."""
    if depth > 32:
        raise ContractError(f"{where}: nested more than 32 levels deep")
    if data is None or isinstance(data, (bool, int)):
        return data
    if isinstance(data, float):
        if not math.isfinite(data):
            raise ContractError(f"{where}: expected a finite number, got {data}")
        return data
    if isinstance(data, str):
        _check_text(data, where, {"max_length": 65536})
        return data
    if isinstance(data, (list, tuple)):
        _check_size(len(data), where, {"max_length": 100_000})
        return [_json_like(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(data)]
    if isinstance(data, Mapping):
        _check_size(len(data), where, {"max_length": 100_000})
        return {str(k): _json_like(v, f"{where}.{k}", depth + 1) for k, v in data.items()}
    raise ContractError(f"{where}: {type(data).__name__} is not JSON")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Checked:
    """Mixin: ``__post_init__`` applies every field's :func:`limits` (so pydantic enforces them too)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata:
                _check_bound(getattr(self, f.name), f"{type(self).__name__}.{f.name}", f.metadata)


def _check_bound(value: Any, where: str, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    if isinstance(value, str):
        _check_text(value, where, meta)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(value, where, meta)
    elif isinstance(value, (list, tuple, Mapping)):
        _check_size(len(value), where, meta)


def _f(default: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """A field with :func:`limits` (and an optional default; lists and dicts get a fresh empty one)."""
    meta = limits(**bounds)
    if default is list or default is dict:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


_SLOT = r"^[ab]$"


# --- the desired state (server -> device) ------------------------------------------------------------


@dataclass(frozen=True)
class ShadowTarget(Checked):
    """A version to run beside the active one (a rollout's shadow wave)."""

    version: int = _f(ge=0, le=2**31 - 1)
    manifest_target: str = _f(max_len=300, min_len=1)


@dataclass(frozen=True)
class DesiredModel(Checked):
    """One model the device should run: the signed manifest target and where it comes from."""

    name: str = _f(pattern=_NAME)
    version: int = _f(ge=0, le=2**31 - 1)
    manifest_target: str = _f(max_len=300, min_len=1)
    variant: str | None = _f(None, max_len=100)
    rollout_id: int | None = _f(None, ge=0, le=2**31 - 1)
    shadow: ShadowTarget | None = None
    start_after: str | None = _f(None, max_len=64)


@dataclass(frozen=True)
class FallbackSection(Checked):
    """The cloud endpoint that answers when the local model cannot (OIP v2 base URL)."""

    url: str | None = _f(None, max_len=2000)
    model: str | None = _f(None, max_len=100)
    models: dict[str, str] = _f(dict, max_len=100)


@dataclass(frozen=True)
class TelemetrySection(Checked):
    """The fleet's telemetry settings (the device keeps its own for what is left out)."""

    window_s: float | None = _f(None, ge=1, le=86_400)
    sample_rate: float | None = _f(None, ge=0, le=1)
    reservoir_size: int | None = _f(None, ge=0, le=100_000)
    upload_interval_s: float | None = _f(None, ge=1, le=86_400)


@dataclass(frozen=True)
class DesiredState(Checked):
    """What the server wants this device to run (``GET /api/v1/device/desired-state``)."""

    device_id: str | None = _f(None, max_len=100)
    poll_interval_s: float | None = _f(None, ge=1, le=86_400)
    jitter_s: float | None = _f(None, ge=0, le=86_400)
    models: list[DesiredModel] = _f(list, max_len=100)
    fallback: FallbackSection | None = None
    telemetry: TelemetrySection | None = None


# --- inventory and events (device -> server) ------------------------------------------------------


@dataclass(frozen=True)
class InstalledBundle(Checked):
    """One non-empty slot of one model, as the inventory reports it."""

    name: str = _f(min_len=1, max_len=100)
    version: int = _f(ge=0, le=2**31 - 1)
    variant: str | None = _f(None, max_len=100)
    slot: str | None = _f(None, max_len=32)
    state: str | None = _f(None, max_len=32)
    runtime: str | None = _f(None, max_len=32)  # the runtime the variant runs on there (validated for it)
    runtime_version: str | None = _f(None, max_len=64)


@dataclass(frozen=True)
class Inventory(Checked):
    """``PUT /api/v1/device/inventory``: what the device can run and what it holds."""

    capabilities: dict[str, Any] = _f(max_len=200)
    installed: list[InstalledBundle] = _f(list, max_len=100)
    agent_version: str | None = _f(None, max_len=32)
    hw_class: str | None = _f(None, max_len=64)


@dataclass(frozen=True)
class HeartbeatModel(Checked):
    """A model version the device holds, and in which state (active, previous, shadow...)."""

    name: str = _f(min_len=1, max_len=100)
    version: int = _f(ge=0, le=2**31 - 1)
    state: str | None = _f(None, max_len=32)


@dataclass(frozen=True)
class Heartbeat(Checked):
    """The ``heartbeat`` event: installed versions, health, what is served and the queue."""

    id: str = _f(min_len=1, max_len=64)
    at: str = _f(min_len=1, max_len=64)
    uptime_s: float = _f(ge=0)
    type: Literal["heartbeat"] = "heartbeat"
    model: str | None = _f(None, max_len=100)
    version: int | None = None
    models: list[HeartbeatModel] = _f(list, max_len=200)
    health: str | None = _f(None, max_len=200)
    serving: list[str] = _f(list, max_len=100)
    queue: dict[str, Any] = _f(dict, max_len=50)
    buffer: dict[str, Any] = _f(dict, max_len=50)
    update_in_progress: str | None = _f(None, max_len=64)
    repairs: int = _f(0, ge=0)


InstallResult = Literal["installed", "failed", "rolled_back"]


@dataclass(frozen=True)
class InstallEvent(Checked):
    """The ``install`` event: the outcome of one deployment (its ``id`` is the deployment id)."""

    id: str = _f(min_len=1, max_len=64)
    at: str = _f(min_len=1, max_len=64)
    model: str = _f(min_len=1, max_len=100)
    version: int = _f(ge=0, le=2**31 - 1)
    result: InstallResult | None = None
    to_version: int | None = _f(None, ge=0, le=2**31 - 1)
    type: Literal["install"] = "install"
    from_version: int | None = _f(None, ge=0, le=2**31 - 1)
    deployment_id: int | None = _f(None, ge=0, le=2**31 - 1)  # the server's rollout id, when there is one
    reason: str | None = _f(None, max_len=2000)
    state_path: list[str] = _f(list, max_len=200)
    status: str | None = _f(None, max_len=32)
    variant: str | None = _f(None, max_len=100)
    runtime: str | None = _f(None, max_len=32)  # the runtime the variant was validated on that runs it here
    runtime_version: str | None = _f(None, max_len=64)
    health: dict[str, Any] = _f(dict, max_len=50)
    error_kind: str | None = _f(None, max_len=32)
    downgrade: bool | None = None  # the director sent the device to an older version (above the release floor)


@dataclass(frozen=True)
class RepairEvent(Checked):
    """The ``repair`` event: a damaged file the agent set aside at start, and what it did instead."""

    id: str = _f(min_len=1, max_len=64)
    at: str = _f(min_len=1, max_len=64)
    file: str = _f(min_len=1, max_len=500)
    reason: str = _f(min_len=1, max_len=2000)
    action: str = _f(min_len=1, max_len=2000)
    type: Literal["repair"] = "repair"
    model: str | None = _f(None, max_len=100)
    version: int | None = None
    quarantined_as: str | None = _f(None, max_len=500)


EVENT_MODELS: dict[str, type] = {"heartbeat": Heartbeat, "install": InstallEvent, "repair": RepairEvent}
"""Event types whose shape the contract fixes (others, e.g. ``drops``, are free-form)."""


# --- the agent's state files ----------------------------------------------------------------------


@dataclass(frozen=True)
class SlotPointer(Checked):
    """``models/<name>/pointer.json``: the slot served, the last one that passed, the one before it."""

    active: str | None = _f(None, max_len=1, pattern=_SLOT)
    committed: str | None = _f(None, max_len=1, pattern=_SLOT)
    previous: str | None = _f(None, max_len=1, pattern=_SLOT)


@dataclass(frozen=True)
class SlotMarker(Checked):
    """``slot_<x>/slot.json``: written last, after every file of the slot was verified and fsynced."""

    slot: str = _f(max_len=16, pattern=r"^(a|b|shadow)$")
    name: str = _f(min_len=1, max_len=100)
    version: int = _f(ge=0, le=2**31 - 1)
    variant: str = _f(min_len=1, max_len=100)
    manifest_sha256: str = _f(pattern=_SHA256)


FailedTargets = dict[str, str]
"""``failed.json``: ``name@version`` -> why it failed for good."""


@dataclass(frozen=True)
class LastUpdate(Checked):
    """``last_update.json``: the outcome of the last deployment."""

    model: str = _f(min_len=1, max_len=100)
    version: int = _f(ge=0)
    status: str = _f(min_len=1, max_len=32)
    error: str | None = _f(None, max_len=MAX_TEXT)
    deployment_id: str | None = _f(None, max_len=64)
    finished_at: float | None = None
    health: dict[str, Any] = _f(dict, max_len=50)
    history: list[str] = _f(list, max_len=500)


@dataclass(frozen=True)
class SavedDesiredState(Checked):
    """``desired.json``: the last desired state and its ETag (so a restart needs no network)."""

    state: DesiredState | None = None
    etag: str | None = _f(None, max_len=200)


@dataclass(frozen=True)
class EnrollmentRecord(Checked):
    """``identity/enrollment.json`` (0600): what the server said at enrollment."""

    server_url: str = _f(min_len=1, max_len=2000)
    device_id: str = _f(min_len=1, max_len=100)
    access_token: str = _f(min_len=1, max_len=500)
    status: str = _f(min_len=1, max_len=32)
    metadata_url: str = _f(min_len=1, max_len=2000)
    targets_url: str = _f(min_len=1, max_len=2000)


@dataclass(frozen=True)
class RetryEntry(Checked):
    """One model's failing target in ``retry.json`` (``device_agent.update.backoff``)."""

    target: str = _f(max_len=1000)
    failures: int = _f(0, ge=0)
    next_at: float = 0.0
    error: str = _f("", max_len=1000)


RetrySchedule = dict[str, RetryEntry]
"""``retry.json``: model -> its failing target and when it may be tried again."""


@dataclass(frozen=True)
class TelemetryWindowSetting(Checked):
    """``telemetry_settings.json``: the fleet's last telemetry section, kept across restarts."""

    section: TelemetrySection = field(default_factory=TelemetrySection)


__all__ = [
    "CONTRACT_VERSION",
    "EVENT_MODELS",
    "Checked",
    "DesiredModel",
    "DesiredState",
    "EnrollmentRecord",
    "FailedTargets",
    "FallbackSection",
    "Heartbeat",
    "HeartbeatModel",
    "InstallEvent",
    "InstalledBundle",
    "Inventory",
    "LastUpdate",
    "RepairEvent",
    "RetryEntry",
    "RetrySchedule",
    "SavedDesiredState",
    "ShadowTarget",
    "SlotMarker",
    "SlotPointer",
    "TelemetrySection",
    "TelemetryWindowSetting",
    "limits",
    "parse",
    "parse_json",
    "to_dict",
]

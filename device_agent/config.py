"""Agent configuration: one plain dataclass, loaded from a TOML file and the environment.

Precedence, lowest first: the defaults below, the TOML file (keys at the top level or under an
``[agent]`` table), then environment variables ``EDGEFLEET_AGENT_<KEY>`` (for example
``EDGEFLEET_AGENT_POLL_INTERVAL_S=60``). Every limit carries its unit in its name; byte limits also
accept a string with a unit (``"2GB"``, ``"512MiB"``) so that an operator can write what they mean.

Three tables reach the rest: ``[llm]`` (:class:`device_agent.llm.LlmSettings`: limits of language
models, the redaction hook, the cloud's OpenAI-compatible base URL), ``[serving]`` (every field of
:class:`device_agent.serving.ServingConfig`:
cloud fallback, circuit breaker, result cache, deadlines) and ``[telemetry]`` (every field of
:class:`device_agent.telemetry.recorder.TelemetrySettings`: windows, sampling, buffer cap...). Their
environment form is ``EDGEFLEET_AGENT_SERVING__<KEY>`` / ``EDGEFLEET_AGENT_TELEMETRY__<KEY>``
(values as JSON: ``5``, ``true``, ``"https://..."``). Both are checked when the config is loaded,
so a typo fails at start, naming the key.
The file is found at ``--config``, else ``$EDGEFLEET_AGENT_CONFIG``, else
``/etc/edgefleet/agent.toml`` if it exists; with no file the defaults and environment apply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundles.contract import parse
from bundles.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 devices
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/edgefleet/agent.toml")
ENV_PREFIX = "EDGEFLEET_AGENT_"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_PREFIXES = ("k", "m", "g", "t")


@dataclass(frozen=True)
class AgentConfig:
    """Every setting of the agent, with its unit in its name.

    ``server_url`` and the access token come from enrollment (stored under ``state_dir``); setting
    ``server_url`` here only matters before enrollment.
    """

    state_dir: Path = Path("/var/lib/edgefleet-agent")
    server_url: str = ""
    # update loop
    poll_interval_s: float = 300.0
    jitter_s: float = 30.0
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 600.0
    retry_initial_s: float = 60.0  # a deployment that failed before changing the device: first retry after
    retry_max_s: float = 3600.0  # ... doubling up to this (reset by a new desired target)
    request_timeout_s: float = 30.0
    max_state_saves: int = 28
    # download and install limits
    max_bundle_bytes: int = 2 * 10**9
    min_free_disk_bytes: int = 100 * 10**6
    max_archive_members: int = 10_000
    # health check: slack over the manifest's budgets (1.5 = 50 % over the budget still passes)
    health_latency_slack: float = 1.5
    health_memory_slack: float = 1.5
    health_runs: int = 5
    # inference
    threads: int = 0  # 0 = the manifest's runtime_config.threads
    max_concurrency: int = 4
    max_waiting: int = 16
    queue_timeout_s: float = 1.0
    startup_wait_s: float = 30.0  # a request during start-up waits this long for the slots to be verified and loaded
    # localhost API (waitress; see docs/agent.md "Localhost HTTP API")
    http_host: str = "127.0.0.1"
    http_port: int = 8181
    http_threads: int = 0  # 0 = max_concurrency
    http_backlog: int = 1024
    http_connection_limit: int = 256
    http_read_timeout_s: float = 10.0  # headers and body of one request must be in within this...
    http_min_read_rate_bytes_s: int = 500  # ...plus a second per this many bytes received (a body still arriving)
    http_idle_timeout_s: float = 30.0  # an idle keep-alive connection is closed after this
    http_inline_max_cpu_ms: float = 1.0  # a model answering within this much CPU runs on the I/O thread (0 = never)
    max_body_bytes: int = 0  # 0 = derived from the memory budget (1 to 64 MiB)
    memory_budget_bytes: int = 0  # 0 = half of what this process may still allocate
    max_batch: int = 64  # largest batch a request may carry when the model does not bound it
    log_level: str = "info"
    # runtimes the agent may run models on (comma-separated names, e.g. "litert"); empty = every installed one
    runtimes: str = ""
    # tables: [serving] -> ServingConfig, [telemetry] -> TelemetrySettings (checked at load)
    serving: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    telemetry: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    llm: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # [llm] -> device_agent.llm.LlmSettings

    @property
    def allowed_runtimes(self) -> tuple[str, ...]:
        """The ``runtimes`` setting as names; empty means every runtime installed on the device."""
        return tuple(r.strip() for r in self.runtimes.split(",") if r.strip())

    def ensure_state_dir(self) -> Path:
        """Create ``state_dir`` (mode 0700, tightened if it exists) and return it.

        It holds the device key, the access token, the desired state and prediction samples: other
        local users have no business reading any of it.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.state_dir.stat().st_mode & 0o077:
            self.state_dir.chmod(0o700)
        return self.state_dir

    @property
    def identity_dir(self) -> Path:
        """Device key, access token and the server's TUF root."""
        return self.state_dir / "identity"

    @property
    def models_dir(self) -> Path:
        """One directory per model with its A/B slots."""
        return self.state_dir / "models"

    @property
    def tuf_dir(self) -> Path:
        """TUF metadata and downloaded targets (the download cache)."""
        return self.state_dir / "tuf"

    @property
    def record_path(self) -> Path:
        """The persisted deployment record of the update state machine."""
        return self.state_dir / "deployment.json"


_FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig)}


def parse_bytes(value: Any, key: str) -> int:
    """``2000``, ``"2GB"``, ``"512MiB"`` -> bytes; anything else is a ConfigError naming ``key``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ConfigError(f'{key}: \'{value}\' is not a size (examples: 1048576, "512MB", "2GiB")')
    number, unit = float(match.group(1)), match.group(2).lower()
    base = 1024 if "i" in unit else 1000
    power = _PREFIXES.index(unit[0]) + 1 if unit[:1] in _PREFIXES else 0
    return int(number * base**power)


def _coerce(key: str, value: Any) -> Any:
    """Convert a TOML or environment value to the type of field ``key``."""
    kind = _FIELDS[key].type
    try:
        if key.endswith("_bytes"):
            return parse_bytes(value, key)
        if kind in ("Path", Path):
            return Path(str(value)).expanduser()
        if kind in ("int", int):
            return int(value)
        if kind in ("float", float):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: '{value}' is not a valid {kind}") from e


TABLES = ("serving", "telemetry", "llm")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read agent config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"agent config {path} is not valid TOML: {e}") from e
    table = data.get("agent", {k: v for k, v in data.items() if k not in TABLES})
    values = dict(table) if isinstance(table, Mapping) else {}
    for name in TABLES:
        section = data.get(name, table.get(name) if isinstance(table, Mapping) else None)
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(f"[{name}] in {path} must be a table")
        values[name] = dict(section or {})
    return values


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in environ.items():
        key = name[len(ENV_PREFIX) :].lower() if name.startswith(ENV_PREFIX) else ""
        table, _, inner = key.partition("__")
        if inner and table in TABLES:
            values.setdefault(table, {})[inner] = _env_value(value)
        elif key in _FIELDS and key not in TABLES:
            values[key] = value
    return values


def _env_value(value: str) -> Any:
    """A table value from the environment: JSON when it parses (``5``, ``true``, ``{...}``), else the text."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _check_tables(config: AgentConfig) -> None:
    """Build each table's target once, so an unknown key or a bad value fails now, naming it."""
    from device_agent.llm import LlmSettings
    from device_agent.serving import ServingConfig
    from device_agent.telemetry.recorder import TelemetrySettings

    for name, kind in (("serving", ServingConfig), ("telemetry", TelemetrySettings), ("llm", LlmSettings)):
        table = getattr(config, name)
        known = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"[{name}]: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            parse(kind, dict(table), name)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[{name}]: {e}") from e


def _validate(config: AgentConfig) -> AgentConfig:
    positive = ("poll_interval_s", "backoff_initial_s", "backoff_max_s", "request_timeout_s", "max_concurrency",
                "retry_initial_s", "retry_max_s", "http_backlog", "http_connection_limit", "http_read_timeout_s",
                "http_min_read_rate_bytes_s", "http_idle_timeout_s", "max_batch")  # fmt: skip
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {getattr(config, key)}")
    if config.max_state_saves < 4:
        raise ConfigError(f"max_state_saves: must be at least 4, got {config.max_state_saves}")
    for key in (
        "max_waiting",
        "threads",
        "http_threads",
        "max_body_bytes",
        "memory_budget_bytes",
        "http_inline_max_cpu_ms",
    ):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key}: must not be negative, got {getattr(config, key)}")
    from bundles.selection import RUNTIME_DISTRIBUTIONS

    unknown = [r for r in config.allowed_runtimes if r not in RUNTIME_DISTRIBUTIONS]
    if unknown:
        raise ConfigError(
            f"runtimes: unknown runtime(s) {', '.join(unknown)} (known: {', '.join(RUNTIME_DISTRIBUTIONS)})"
        )
    return config


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AgentConfig:
    """Build the config from defaults, the TOML file, the environment, then ``overrides``.

    Raises:
        ConfigError: the file is unreadable or invalid, or a key has an invalid value.
    """
    env = os.environ if environ is None else environ
    chosen = path or env.get(f"{ENV_PREFIX}CONFIG") or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    raw: dict[str, Any] = _read_toml(Path(chosen)) if chosen else {}
    values = dict(raw)
    for key, value in _from_env(env).items():
        values[key] = {**values.get(key, {}), **value} if key in TABLES else value
    for key, value in overrides.items():
        if value is not None:
            values[key] = {**values.get(key, {}), **value} if key in TABLES else value
    bad = sorted(k for k in values if k not in _FIELDS)
    if bad:
        raise ConfigError(f"unknown agent setting(s): {', '.join(bad)}")
    coerced = {k: v if k in TABLES else _coerce(k, v) for k, v in values.items()}
    config = _validate(AgentConfig(**coerced))
    _check_tables(config)
    return config

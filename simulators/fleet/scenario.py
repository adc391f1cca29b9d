"""Scenario files: a TOML description of the fleet, the bundles, the rollouts and the faults.

Flow: :func:`load_scenario` reads the file, checks every key against the dataclasses below (an
unknown key or a bad value is a :class:`~bundles.errors.ConfigError` naming it, so a typo never
silently runs another experiment) and returns a :class:`Scenario`. The runner
(:mod:`simulators.fleet.runner`) then starts the servers, publishes the bundles, enrolls the fleet and
runs the rollouts in order. ``docs/simulator.md`` lists every key with an example.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundles.errors import ConfigError
from simulators.fleet.profiles import PROFILES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BEHAVIOURS = ("good", "errors", "nan", "slow", "drift_inputs", "drift_predictions")


@dataclass(frozen=True)
class ServerSpec:
    """The fleet server(s) under test: database and how many ``edgefleet-server run`` processes."""

    database: str = "sqlite"  # "sqlite" or "postgresql" (a fresh database on pg_admin_url, dropped at the end)
    pg_admin_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    processes: int = 1
    rollout_tick_s: float = 1.0
    telemetry_window_s: int = 5
    poll_interval_s: int = 5
    jitter_s: int = 1


@dataclass(frozen=True)
class FleetSpec:
    """How many devices of which hardware, and how they are driven."""

    devices: int = 20
    profiles: dict[str, float] = field(default_factory=lambda: {"pi4": 1.0})  # profile -> share of the fleet
    requests_per_s: float = 1.0  # inference requests each device serves (its app's load)
    concurrency: int = 32  # worker threads running device steps (the devices themselves are tasks on one loop)
    enroll_per_s: float = 200.0  # enrollment pace at start (a fleet is not switched on in one instant)
    # as the real agent: a failed or late local answer falls back to the cloud endpoint the desired state
    # names (counted as a fallback); false: that endpoint is down, the failure is recorded as an error
    cloud_fallback: bool = True
    seed: int = 0


@dataclass(frozen=True)
class SimulatorSpec:
    """How the simulator itself runs (not part of what is simulated)."""

    workers: int = 0  # simulator processes the fleet is sharded over; 0: one per 2,500 devices, at most one per core


@dataclass(frozen=True)
class BundleSpec:
    """A bundle version and how it behaves on the devices (``good`` or one bad-model behaviour)."""

    version: int
    behaviour: str = "good"
    rate: float = 1.0  # the share of requests the behaviour hits (errors, NaN outputs)


@dataclass(frozen=True)
class RolloutSpec:
    """A rollout as an operator creates it (``edgefleet-server rollout create`` fields)."""

    version: int
    waves: str = "2%,25%,100%"
    gates: tuple[str, ...] = ("error_rate<0.01 min=50",)
    soak: str = "10s"
    device_timeout: str = "60s"
    jitter: str = "0s"
    on_breach: str = "rollback"
    expect: str = "completed"  # what the scenario asserts: completed or rolled_back
    timeout_s: float = 300.0


@dataclass(frozen=True)
class FaultSpec:
    """The faults injected; rates are per request (loss, cut, corrupt) or shares of the fleet."""

    packet_loss: float = 0.0  # a request fails to connect (the device retries with backoff)
    slow_link_share: float = 0.0  # this share of devices has a link 20x slower than its profile's
    cut_download: float = 0.0  # a target download is cut mid-stream (the TUF fetcher resumes with Range)
    corrupt_download: float = 0.0  # a target arrives with flipped bytes (TUF refuses it; the device retries)
    power_loss: float = 0.0  # an install loses power at a random step (the device restarts and resumes)
    offline_share: float = 0.0  # this share of devices goes offline ...
    offline_s: float = 0.0  # ... for this long (simulated days are compressed: see docs/simulator.md)
    offline_at_s: float = 5.0
    clock_skew_share: float = 0.0  # this share of devices has a clock off by clock_skew_s
    clock_skew_s: float = 0.0
    server_restart_at_s: float | None = None  # kill the server process running the background loops at this time
    server_down_s: float = 5.0


@dataclass(frozen=True)
class Scenario:
    name: str
    server: ServerSpec
    fleet: FleetSpec
    bundles: tuple[BundleSpec, ...]
    rollouts: tuple[RolloutSpec, ...]
    faults: FaultSpec
    source: Path | None = None
    simulator: SimulatorSpec = field(default_factory=SimulatorSpec)

    def bundle(self, version: int) -> BundleSpec:
        return next((b for b in self.bundles if b.version == version), BundleSpec(version))


def _build(kind: Any, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"scenario: [{where}] must be a table")
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"scenario: unknown key {unknown[0]!r} in [{where}] (known: {', '.join(sorted(names))})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return kind(**values)
    except TypeError as e:
        raise ConfigError(f"scenario: [{where}]: {e}") from e


def parse_scenario(data: Mapping[str, Any], name: str = "scenario", source: Path | None = None) -> Scenario:
    """Check decoded TOML and build the :class:`Scenario` (ConfigError names the bad key)."""
    known = {"name", "server", "fleet", "bundles", "rollouts", "faults", "simulator"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"scenario: unknown section {unknown[0]!r} (known: {', '.join(sorted(known))})")
    fleet_data = dict(data.get("fleet", {}))
    if "profiles" in fleet_data:
        fleet_data["profiles"] = dict(fleet_data["profiles"])
    scenario = Scenario(
        name=str(data.get("name", name)),
        server=_build(ServerSpec, data.get("server", {}), "server"),
        fleet=_build(FleetSpec, {k: v for k, v in fleet_data.items() if k != "profiles"}, "fleet"),
        bundles=tuple(_build(BundleSpec, b, f"bundles[{i}]") for i, b in enumerate(data.get("bundles", []))),
        rollouts=tuple(_build(RolloutSpec, r, f"rollouts[{i}]") for i, r in enumerate(data.get("rollouts", []))),
        faults=_build(FaultSpec, data.get("faults", {}), "faults"),
        source=source,
        simulator=_build(SimulatorSpec, data.get("simulator", {}), "simulator"),
    )
    if "profiles" in fleet_data:
        scenario = dataclasses.replace(
            scenario, fleet=dataclasses.replace(scenario.fleet, profiles=fleet_data["profiles"])
        )
    check(scenario)
    return scenario


def check(scenario: Scenario) -> None:
    """Values in range, names known; raises ConfigError with the first problem."""
    fleet, server = scenario.fleet, scenario.server
    if fleet.devices < 1 or fleet.concurrency < 1 or fleet.requests_per_s <= 0 or fleet.enroll_per_s <= 0:
        raise ConfigError("scenario: [fleet] devices, concurrency, requests_per_s and enroll_per_s must be positive")
    for profile, share in fleet.profiles.items():
        if profile not in PROFILES:
            raise ConfigError(f"scenario: unknown hardware profile {profile!r} (known: {', '.join(PROFILES)})")
        if not isinstance(share, int | float) or share < 0:
            raise ConfigError(f"scenario: profile share of {profile!r} must be a number >= 0")
    if not isinstance(scenario.simulator.workers, int) or scenario.simulator.workers < 0:
        raise ConfigError("scenario: [simulator] workers must be an integer >= 0 (0: chosen from the core count)")
    if server.database not in ("sqlite", "postgresql") or server.processes < 1:
        raise ConfigError("scenario: [server] database must be sqlite or postgresql, processes >= 1")
    for bundle in scenario.bundles:
        if bundle.behaviour not in BEHAVIOURS:
            raise ConfigError(
                f"scenario: bundle behaviour {bundle.behaviour!r} unknown (known: {', '.join(BEHAVIOURS)})"
            )
    versions = {b.version for b in scenario.bundles}
    for rollout in scenario.rollouts:
        if rollout.version not in versions:
            raise ConfigError(f"scenario: rollout of version {rollout.version} has no [[bundles]] entry")
        if rollout.expect not in ("completed", "rolled_back"):
            raise ConfigError("scenario: rollout expect must be completed or rolled_back")
    if 1 not in versions:
        raise ConfigError("scenario: the fleet starts on bundle version 1: add [[bundles]] version = 1")


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"scenario: cannot read {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"scenario: {path} is not valid TOML: {e}") from e
    return parse_scenario(data, path.stem, path)

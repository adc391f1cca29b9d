"""Fixtures of the rollout tests: a published digits@1 and digits@2, a fleet, a clock and an engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.db import make_session_factory, session_scope
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.rollouts.models import Rollout
from fleet_server.rollouts.service import CreateRequest, create_rollout
from fleet_server.rollouts.spec import RolloutPolicy, parse_waves
from tests.fleet_server.rollouts.fleetsim import Clock, Fleet, publish

SOAK_S, TIMEOUT_S = 600.0, 300.0


@pytest.fixture
def factory(db_engine: sa.Engine) -> sessionmaker[Session]:
    return make_session_factory(db_engine)


@pytest.fixture
def fleet(factory: sessionmaker[Session], tmp_path: Path) -> Fleet:
    fleet = Fleet(factory)
    with session_scope(factory) as session:
        for version in (1, 2):
            fleet.manifests[version] = publish(session, tmp_path, "digits", version)
    return fleet


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(factory: sessionmaker[Session], clock: Clock) -> RolloutEngine:
    return RolloutEngine(factory, clock=clock)


def policy(**kw: Any) -> RolloutPolicy:
    """A test policy: 10 min soak, 5 min device timeout, no jitter unless given."""
    defaults: dict[str, Any] = {"soak_s": SOAK_S, "device_timeout_s": TIMEOUT_S, "jitter_s": 0.0}
    waves = parse_waves(kw.pop("waves", "1%,50%,100%"))
    gates = tuple(kw.pop("gates", ("error_rate<0.01 min=50",)))
    return RolloutPolicy(waves=waves, gates=gates, **{**defaults, **kw})


@pytest.fixture
def create(factory: sessionmaker[Session], clock: Clock) -> Callable[..., int]:
    """Create a rollout of digits@2 to group lab; returns its id."""

    def make(targets: tuple[str, ...] = ("group:lab",), version: int = 2, draft: bool = False, **kw: Any) -> int:
        with session_scope(factory) as session:
            rollout: Rollout = create_rollout(session, CreateRequest("digits", version, targets, policy(**kw), draft),
                                              actor="test", now=clock())  # fmt: skip
            return rollout.id

    return make

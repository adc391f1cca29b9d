"""The telemetry maintenance loop: evaluate drift monitors and apply retention, in the server process.

Started by the router's lifespan when the server runs its background tasks (``api.lifespan``), in
the process that holds the background leadership (``fleet_server.locks``):
every :data:`DRIFT_INTERVAL_S` every model that reported in the last day is evaluated (alerts open,
update or resolve), and once a day raw telemetry older than the retention limits is deleted. Each
tick runs in a worker thread with its own transaction; an error is logged and the loop goes on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from bundles.errors import EdgeFleetError
from fleet_server.db import session_scope, utcnow
from fleet_server.telemetry import monitors, query

log = logging.getLogger(__name__)
DRIFT_INTERVAL_S = 300.0
PRUNE_INTERVAL_S = 86_400.0


@dataclass
class Maintenance:
    """What the loop does on each tick, and when it last pruned."""

    session_factory: sessionmaker[Session]
    retention: query.Retention = field(default_factory=query.Retention)
    last_prune: dt.datetime | None = None
    is_leader: Callable[[], bool] = lambda: True

    def tick(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Evaluate drift now, prune when a day has passed; returns what it did (open alerts, rows deleted)."""
        now = now or utcnow()
        with session_scope(self.session_factory) as session:
            done = {"open_alerts": len(monitors.evaluate_all(session, now))}
            if self.last_prune is None or (now - self.last_prune).total_seconds() >= PRUNE_INTERVAL_S:
                deleted = query.prune(session, self.retention, now)
                done.update(deleted)
                self.last_prune = now
        return done

    async def run(self, interval_s: float = DRIFT_INTERVAL_S) -> None:
        """Tick every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            if not self.is_leader():
                continue
            try:
                await asyncio.to_thread(self.tick)
            except (SQLAlchemyError, EdgeFleetError):
                log.exception("telemetry maintenance tick failed; retrying at the next tick")

"""Desired state: what a device should run, answered with an ETag so unchanged polls are cheap 304s.

The hot path is one SQL round trip without the ORM (awaited on an asyncio psycopg connection on
PostgreSQL, see ``async_pg``): the device (by token hash), its assignments
and its group poll-interval override in a single query. The rendered body and its ETag are memoised
per device and keyed by the exact row values, so an unchanged poll hashes nothing and serialises
nothing; a changed row (the rollout engine or an admin writing ``assignments``) changes the key, so
the memo can never serve stale state, whichever process made the change.

``last_seen_at`` is not written per poll: polls are recorded in memory and flushed in one
statement by :meth:`DesiredStateService.flush_last_seen` (a background task every few seconds).

On PostgreSQL a process that runs its background tasks also keeps each token's answer in memory
and answers repeated polls (and authenticates telemetry uploads) without the database, for as long
as it listens on the ``edgefleet_desired_state`` channel (:func:`listen_for_changes`): triggers
(migration ``0006``) notify a device's id whenever a row its state is made of changes, in any
process, and the entry is dropped. An answer read while a notification arrived is not kept (it may
predate the change), and a lost listening connection drops every entry and stops caching until it
listens again, so the cache is never more stale than the notification's delivery.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, bindparam, text

from bundles.contract import DesiredState, parse
from bundles.errors import AuthError
from fleet_server.db import UTCDateTime, make_sqlite_reader, utcnow
from fleet_server.errors import ForbiddenError
from fleet_server.security import DEVICE_TOKEN_PREFIX, hash_secret
from fleet_server.services.async_pg import AsyncPgPool, conninfo_for
from fleet_server.settings import Settings

log = logging.getLogger("fleet_server.desired_state")
MEMO_MAX_DEVICES = 500_000

# One round trip: the device, its assignments and its group poll-interval override. Run on the raw
# DBAPI connection (no SQLAlchemy statement compilation or result processing on the hot path);
# ``{p}`` is the driver's named-parameter marker.
_STATE_SQL = """
    SELECT d.id, d.status, a.model_name, a.bundle_version, a.variant, a.rollout_id, a.shadow_version,
           a.start_after, a.updated_at,
           (SELECT MIN(g.poll_interval_s) FROM device_group_members m
              JOIN device_groups g ON g.id = m.group_id WHERE m.device_id = d.id)
    FROM devices d LEFT JOIN assignments a ON a.device_id = d.id
    WHERE d.token_hash = {p}
    ORDER BY a.model_name
"""
_LAST_SEEN_SQL = text("UPDATE devices SET last_seen_at = :at WHERE id = :device_id").bindparams(
    bindparam("at", type_=UTCDateTime())
)
# PostgreSQL: one statement for the whole buffer instead of one row update per device.
_PG_LAST_SEEN_SQL = text(  # rows locked in id order first: two server processes flushing overlapping devices
    # would otherwise lock them in their join orders and deadlock (seen with 10,000 simulated devices)
    "WITH locked AS (SELECT id FROM devices WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id FOR UPDATE)"
    " UPDATE devices SET last_seen_at = u.at"
    " FROM unnest(CAST(:ids AS text[]), CAST(:ats AS timestamptz[])) AS u(id, at)"
    " WHERE devices.id = u.id AND devices.id IN (SELECT id FROM locked)"
)
_PARAM_MARKERS = {"sqlite": ":token_hash", "postgresql": "%(token_hash)s"}


@dataclass(frozen=True)
class RenderedState:
    """A device's desired state as sent on the wire (and the device's status, for authentication)."""

    device_id: str
    etag: str
    body: bytes
    status: str = "accepted"


def manifest_target(name: str, version: int) -> str:
    """The TUF target path of a bundle's manifest (``docs/interfaces.md``)."""
    return f"{name}/{version}/manifest.json"


class DesiredStateService:
    """Renders desired state per device, memoised by the rows that determine it."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._sql = _STATE_SQL.format(p=_PARAM_MARKERS[engine.dialect.name])
        is_postgres = engine.dialect.name == "postgresql"
        self.async_pool = AsyncPgPool(conninfo_for(engine), settings.poll_db_connections) if is_postgres else None
        # SQLite: the query runs inline on the event loop, on a connection of its own (never a pool wait)
        self.reader = None if is_postgres else make_sqlite_reader(engine, settings.sqlite_busy_timeout_ms)
        self._memo: dict[str, tuple[tuple[Any, ...], RenderedState]] = {}
        self._seen: dict[str, dt.datetime] = {}
        self._seen_lock = threading.Lock()
        self._by_token: dict[str, RenderedState] = {}  # only while listening (module docstring)
        self._tokens_of: dict[str, set[str]] = {}
        self._listening = False
        self._changes = 0

    async def for_token(self, token: str) -> RenderedState:
        """The desired state of the device holding ``token`` (401/403 for bad or retired tokens).

        PostgreSQL: from memory while this process listens for changes, else awaited on an asyncio
        connection, so polls overlap their round trips. SQLite: a local query of tens of
        microseconds, run inline (cheaper than any hop to a thread).
        """
        token_hash = self._token_hash(token)
        cached = self._by_token.get(token_hash)
        if cached is not None:
            self._note_seen(cached.device_id)
            return cached
        changes = self._changes
        params = {"token_hash": token_hash}
        rows = await self.async_pool.fetchall(self._sql, params) if self.async_pool else self._query(token_hash)
        state = self._from_rows(rows)
        if self._listening and changes == self._changes:
            self._by_token[token_hash] = state
            self._tokens_of.setdefault(state.device_id, set()).add(token_hash)
        return state

    def listening(self, on: bool) -> None:
        """Start (or stop) answering from memory; either way, forget every kept answer."""
        self._listening = on
        self._changes += 1
        self._by_token.clear()
        self._tokens_of.clear()

    def changed(self, device_id: str) -> None:
        """A notification: the state of ``device_id`` (``*``: every device) may have changed."""
        self._changes += 1
        if device_id == "*":
            self._by_token.clear()
            self._tokens_of.clear()
            return
        for token_hash in self._tokens_of.pop(device_id, ()):
            self._by_token.pop(token_hash, None)

    def for_token_sync(self, token: str) -> RenderedState:
        """The same, for callers outside an event loop (CLI, tests)."""
        return self._from_rows(self._query(self._token_hash(token)))

    def _token_hash(self, token: str) -> str:
        if not token.startswith(DEVICE_TOKEN_PREFIX):
            raise AuthError("this bearer token is not a device access token")
        return hash_secret(token, self.settings.token_pepper)

    def _from_rows(self, rows: list[tuple[Any, ...]]) -> RenderedState:
        if not rows:
            raise AuthError("unknown or revoked device access token")
        device_id, status = rows[0][0], rows[0][1]
        if status in ("rejected", "decommissioned"):
            raise ForbiddenError(f"device {device_id} is {status}")
        self._note_seen(device_id)
        return self._rendered(device_id, status, tuple(rows))

    def _query(self, token_hash: str) -> list[tuple[Any, ...]]:
        """Run the state query on a raw DBAPI connection (a SELECT: no transaction to commit): SQLite's
        read-only pool, or a pooled connection (PostgreSQL callers outside an event loop)."""
        connection = (self.reader or self.engine).raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute(self._sql, {"token_hash": token_hash})
            rows = [tuple(row) for row in cursor.fetchall()]
            cursor.close()
            return rows
        finally:
            connection.close()

    def _rendered(self, device_id: str, status: str, key: tuple[Any, ...]) -> RenderedState:
        cached = self._memo.get(device_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        body = json.dumps(self.render(key), separators=(",", ":"), sort_keys=True).encode()
        rendered = RenderedState(device_id, '"' + hashlib.sha256(body).hexdigest()[:32] + '"', body, status)
        if len(self._memo) >= MEMO_MAX_DEVICES:
            self._memo.clear()
        self._memo[device_id] = (key, rendered)
        return rendered

    def render(self, rows: tuple[Any, ...]) -> dict[str, Any]:
        """The ``DesiredState`` document (keys fixed by docs/interfaces.md) from the query rows."""
        device_id, status, poll_override = rows[0][0], rows[0][1], rows[0][9]
        models = [_model_entry(row) for row in rows if row[2] is not None] if status == "accepted" else []
        poll_interval_s = int(poll_override or self.settings.poll_interval_s)
        state = {
            "device_id": device_id,
            "poll_interval_s": poll_interval_s,
            "jitter_s": min(self.settings.jitter_s, poll_interval_s // 2),
            "models": models,
            "fallback": self._fallback(models),
            "telemetry": {
                "window_s": self.settings.telemetry_window_s,
                "sample_rate": self.settings.telemetry_sample_rate,
                "reservoir_size": self.settings.telemetry_reservoir_size,
                "upload_interval_s": self.settings.telemetry_upload_interval_s,
            },
        }
        parse(DesiredState, state, "desired state")  # the device's own contract: never send what it would refuse
        return state

    def _fallback(self, models: list[dict[str, Any]]) -> dict[str, Any]:
        """The fleet's inference endpoint (always announced, so devices need not guess it)."""
        return {"url": self.settings.inference_url, "model": models[0]["name"] if models else None}

    def _note_seen(self, device_id: str) -> None:
        with self._seen_lock:
            self._seen[device_id] = utcnow()

    def flush_last_seen(self) -> int:
        """Write the buffered poll times in one statement; returns how many devices were updated."""
        with self._seen_lock:
            seen, self._seen = self._seen, {}
        if not seen:
            return 0
        with self.engine.begin() as connection:
            if self.engine.dialect.name == "postgresql":
                connection.execute(_PG_LAST_SEEN_SQL, {"ids": list(seen), "ats": list(seen.values())})
            else:
                connection.execute(_LAST_SEEN_SQL, [{"device_id": k, "at": v} for k, v in seen.items()])
        return len(seen)


def _model_entry(row: Any) -> dict[str, Any]:
    name, version, shadow = row[2], int(row[3]), row[6]
    return {
        "name": name,
        "version": version,
        "manifest_target": manifest_target(name, version),
        "variant": row[4],
        "rollout_id": row[5],
        "shadow": None
        if shadow is None
        else {"version": int(shadow), "manifest_target": manifest_target(name, shadow)},
        "start_after": as_utc(row[7]).isoformat() if row[7] is not None else None,
    }


CHANNEL = "edgefleet_desired_state"


async def listen_for_changes(service: DesiredStateService, retry_s: float = 2.0) -> None:
    """Keep a LISTEN connection (PostgreSQL) and forward each notification to ``service``, until cancelled."""
    import psycopg

    if service.async_pool is None:
        return
    while True:
        try:
            connection = await psycopg.AsyncConnection.connect(service.async_pool.conninfo, autocommit=True)
            async with connection:
                await connection.execute(f"LISTEN {CHANNEL}")
                service.listening(True)
                async for notification in connection.notifies():
                    service.changed(notification.payload)
        except psycopg.Error as error:
            log.warning("desired-state notifications lost (%s); answering from the database meanwhile", error)
        finally:
            service.listening(False)
        await asyncio.sleep(retry_s)


def as_utc(value: dt.datetime | str) -> dt.datetime:
    """A timestamp column as an aware UTC datetime (SQLite hands back its stored string)."""
    parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of an ``If-None-Match`` header against our ETag."""
    if not if_none_match:
        return False
    candidates = [part.strip().removeprefix("W/") for part in if_none_match.split(",")]
    return "*" in candidates or etag in candidates

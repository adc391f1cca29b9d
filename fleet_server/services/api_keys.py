"""Admin API keys: created (secret shown once), listed, revoked, and checked on every admin request.

The request-time check is one indexed lookup by the key's HMAC; ``last_used_at`` is written at most
once a minute per key so that read-only traffic does not turn into writes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from bundles.errors import AuthError, ConfigError
from fleet_server.audit import record
from fleet_server.db import utcnow
from fleet_server.models import ROLES, ApiKey
from fleet_server.principals import AdminPrincipal
from fleet_server.security import ADMIN_KEY_PREFIX, display_prefix, hash_secret, new_secret
from fleet_server.services.credentials import revoke_credential
from fleet_server.settings import Settings

LAST_USED_RESOLUTION_S = 60


def describe_api_key(key: ApiKey) -> dict[str, Any]:
    """The public view of a key (never its secret or hash)."""
    return {
        "id": key.id,
        "name": key.name,
        "role": key.role,
        "prefix": key.prefix,
        "created_at": key.created_at.isoformat(),
        "created_by": key.created_by,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
    }


def create_api_key(session: Session, *, name: str, role: str, actor: str, pepper: str) -> tuple[ApiKey, str]:
    """A new key with ``role``; returns the row and the secret (the only time it is visible)."""
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not name.strip():
        raise ConfigError("an API key needs a non-empty name")
    secret = new_secret(ADMIN_KEY_PREFIX)
    key = ApiKey(name=name, role=role, key_hash=hash_secret(secret, pepper), prefix=display_prefix(secret),
                 created_by=actor)  # fmt: skip
    session.add(key)
    session.flush()
    record(session, actor=actor, action="api_key.create", target_type="api_key", target_id=str(key.id),
           after=describe_api_key(key))  # fmt: skip
    return key, secret


def list_api_keys(session: Session) -> list[ApiKey]:
    """Every key, newest first (revoked ones included, marked)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id.desc())))


def revoke_api_key(session: Session, *, key_id: int, actor: str) -> ApiKey:
    """Revoke a key; it stops working immediately. Revoking twice is a no-op."""
    return revoke_credential(session, ApiKey, key_id, kind="api_key", label="API key", actor=actor,
                             describe=describe_api_key)  # fmt: skip


def authenticate_api_key(factory: sessionmaker[Session], settings: Settings, secret: str) -> AdminPrincipal:
    """The principal behind ``secret``; an :class:`AuthError` when it is unknown or revoked."""
    if not secret.startswith(ADMIN_KEY_PREFIX):
        raise AuthError("this bearer token is not an admin API key")
    with factory() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret, settings.token_pepper)))
        if key is None or key.revoked_at is not None:
            raise AuthError("unknown or revoked API key")
        _touch(session, key)
        return AdminPrincipal(key_id=key.id, name=key.name, role=key.role)


def _touch(session: Session, key: ApiKey) -> None:
    """Record the use at most once per resolution; the condition is in the UPDATE, so concurrent
    requests on several processes write it once and never move it backwards."""
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=LAST_USED_RESOLUTION_S)
    if key.last_used_at is None or key.last_used_at < cutoff:
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == key.id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < cutoff))
            .values(last_used_at=now)
        )
        session.commit()

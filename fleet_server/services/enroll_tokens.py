"""Fleet enrollment tokens: created by an admin for a fleet, valid until they expire or are revoked."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.audit import record
from fleet_server.db import utcnow
from fleet_server.models import EnrollmentToken
from fleet_server.security import ENROLL_TOKEN_PREFIX, display_prefix, hash_secret, new_secret
from fleet_server.services.credentials import revoke_credential


def describe_token(token: EnrollmentToken) -> dict[str, Any]:
    """The public view of a token (never its secret)."""
    return {
        "id": token.id, "fleet": token.fleet, "prefix": token.prefix, "expires_at": token.expires_at.isoformat(),
        "max_uses": token.max_uses, "uses": token.uses,
        "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
    }  # fmt: skip


def create_enroll_token(
    session: Session, *, fleet: str, expires_in_s: int, max_uses: int | None, actor: str, pepper: str
) -> tuple[EnrollmentToken, str]:
    """A new token for ``fleet``; returns the row and the secret (visible only now)."""
    secret = new_secret(ENROLL_TOKEN_PREFIX)
    token = EnrollmentToken(fleet=fleet, token_hash=hash_secret(secret, pepper), prefix=display_prefix(secret),
                            created_by=actor, expires_at=utcnow() + dt.timedelta(seconds=expires_in_s),
                            max_uses=max_uses, uses=0)  # fmt: skip
    session.add(token)
    session.flush()
    record(session, actor=actor, action="enroll_token.create", target_type="enroll_token", target_id=str(token.id),
           after=describe_token(token))  # fmt: skip
    return token, secret


def list_enroll_tokens(session: Session) -> list[EnrollmentToken]:
    """Every token, newest first."""
    return list(session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.id.desc())))


def revoke_enroll_token(session: Session, *, token_id: int, actor: str) -> EnrollmentToken:
    """Revoke a token: devices can no longer enroll with it (enrolled devices are not affected)."""
    return revoke_credential(session, EnrollmentToken, token_id, kind="enroll_token", label="enrollment token",
                             actor=actor, describe=describe_token)  # fmt: skip

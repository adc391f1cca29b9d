"""What every stored credential (admin API key, enrollment token) shares: revocation with an audit entry.

Both kinds are rows with a ``revoked_at`` column; revoking sets it once (a second revoke is a
no-op) and records who did it with the row's public view before and after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session

from fleet_server.audit import record
from fleet_server.db import utcnow
from fleet_server.errors import NotFoundError


class Revocable(Protocol):
    id: Any
    revoked_at: Any


Row = TypeVar("Row", bound=Revocable)


def revoke_credential(
    session: Session, model: type[Row], row_id: int, *, kind: str, label: str, actor: str,
    describe: Callable[[Row], dict[str, Any]],
) -> Row:  # fmt: skip
    """Revoke row ``row_id`` of ``model`` (audit action ``<kind>.revoke``); a missing row is a 404."""
    row = session.get(model, row_id)
    if row is None:
        raise NotFoundError(f"{label} {row_id} does not exist")
    if row.revoked_at is None:
        before = describe(row)
        row.revoked_at = utcnow()
        record(session, actor=actor, action=f"{kind}.revoke", target_type=kind, target_id=str(row_id),
               before=before, after=describe(row))  # fmt: skip
    return row

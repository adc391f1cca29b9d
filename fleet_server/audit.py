"""The audit log: every mutation records who did it, what, when, and the state before and after.

Services call :func:`record` inside the same transaction as the change, so a change and its audit
entry are committed together or not at all.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from fleet_server.models import AuditEntry


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add one audit entry to the session's transaction (``action`` like ``device.approve``)."""
    entry = AuditEntry(
        actor=actor, action=action, target_type=target_type, target_id=target_id, before=before, after=after
    )
    session.add(entry)
    return entry

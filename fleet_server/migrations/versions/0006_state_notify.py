"""PostgreSQL: notify every server process when a device's desired state may have changed.

Revision ID: 0006
Revises: 0005

Each server process keeps the desired states it answered in memory (``services.desired_state``) and
listens on the ``edgefleet_desired_state`` channel; these triggers send the device id (or ``*`` for
everyone) whenever a row the desired state is made of changes: its assignments, its status or token,
its group memberships, a group's poll interval. SQLite has no notifications: there each poll reads
its rows (a local query of microseconds).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "edgefleet_notify_state"
FUNCTION = """
CREATE OR REPLACE FUNCTION edgefleet_notify_state() RETURNS trigger AS $$
DECLARE
    row record;
BEGIN
    row := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    IF TG_TABLE_NAME = 'devices' THEN
        PERFORM pg_notify('edgefleet_desired_state', row.id);
    ELSIF TG_TABLE_NAME = 'device_groups' THEN
        PERFORM pg_notify('edgefleet_desired_state', '*');
    ELSE
        PERFORM pg_notify('edgefleet_desired_state', row.device_id);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
TRIGGERS = {
    "assignments": "AFTER INSERT OR UPDATE OR DELETE ON assignments",
    "devices": "AFTER UPDATE OF status, token_hash OR DELETE ON devices",
    "device_group_members": "AFTER INSERT OR UPDATE OR DELETE ON device_group_members",
    "device_groups": "AFTER UPDATE OF poll_interval_s OR DELETE ON device_groups",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    for table, when in TRIGGERS.items():
        op.execute(f"CREATE TRIGGER edgefleet_notify_{table} {when} FOR EACH ROW EXECUTE FUNCTION {NAME}()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS edgefleet_notify_{table} ON {table}")
    op.execute("DROP FUNCTION IF EXISTS edgefleet_notify_state()")

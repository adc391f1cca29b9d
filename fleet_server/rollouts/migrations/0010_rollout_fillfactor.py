"""PostgreSQL: leave room in the pages of the rows the rollout engine rewrites every tick.

Revision ID: 0010
Revises: 0006

Each tick rewrites the evidence of every device that reported since the last one (a sixth of a
10,000-device fleet every 10 s) and the wave's rollups. With full pages each such update puts the
new row version on another page and inserts it into every index of the table; with free room on
the page, PostgreSQL keeps it there as a heap-only tuple (HOT) and touches no index, since the
columns the engine rewrites are not indexed. Pages written before this revision keep no room until
the table is rewritten (``VACUUM FULL rollout_devices``, optional). SQLite has no fill factor.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = {"rollout_devices": 50, "rollout_rollups": 50}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, percent in FILLFACTOR.items():
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {percent})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in FILLFACTOR:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")

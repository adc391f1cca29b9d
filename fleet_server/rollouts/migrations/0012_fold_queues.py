"""The fold's queues of unfolded telemetry, and the evaluation counter that says which devices to classify.

Revision ID: 0012
Revises: 0011

Until this revision the fold marked every row it added (``folded = true``). On PostgreSQL that
rewrote each window (a new row version, entered again into every index of ``metric_windows``, since
the flag was in the condition of a partial index): 20 to 50 ms and 1.6 MB of WAL a tick at 10,000
devices. Now an insert trigger puts the id of every new window, and of every new event the engine
reads, into a narrow queue table (``unfolded_windows``, ``unfolded_events``), and the fold deletes
the ids it added: about 2 ms and 90 kB of WAL for the same rows. The trigger queues whatever writes
the row (intake, an import, a test). ``metric_windows.folded`` is dropped; ``device_events.folded``
stays as what intake writes for the event types the engine never reads (not queued).

``rollouts.evaluations`` counts a rollout's evaluations; ``rollout_devices.evidence_seq`` is that
count when the fold last changed the device's evidence (or the engine released it), so an
evaluation classifies only the devices stamped with its own number, plus those whose timeout has
come, instead of every device of the wave.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUES = {"metric_windows": ("unfolded_windows", "window_id", ""),
          "device_events": ("unfolded_events", "event_id", "NOT NEW.folded")}  # fmt: skip
"""table -> (its queue, the queue's column, the condition on the new row for it to be queued)."""


def upgrade() -> None:
    for table, (queue, column, _) in QUEUES.items():
        op.create_table(queue, sa.Column(column, sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                                         autoincrement=False, nullable=False),
                        sa.PrimaryKeyConstraint(column, name=op.f(f"pk_{queue}")))  # fmt: skip
        op.execute(f"INSERT INTO {queue} ({column}) SELECT id FROM {table} WHERE NOT folded")  # noqa: S608
        op.drop_index(f"ix_{table}_unfolded", table_name=table)
        _create_trigger(table, queue, column)
    op.execute("ALTER TABLE metric_windows DROP COLUMN folded")  # SQLite >= 3.35 drops a column in place
    op.add_column("rollouts", sa.Column("evaluations", sa.Integer(), server_default="0", nullable=False))
    op.add_column("rollout_devices", sa.Column("evidence_seq", sa.Integer(), server_default="0", nullable=False))


def _create_trigger(table: str, queue: str, column: str) -> None:
    condition = QUEUES[table][2]
    insert = f"INSERT INTO {queue} ({column}) VALUES (NEW.id);"  # noqa: S608 - names from QUEUES
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE FUNCTION {queue}_add() RETURNS trigger LANGUAGE plpgsql AS $$"
                   f" BEGIN {insert} RETURN NULL; END $$")  # fmt: skip
        when = f" WHEN ({condition})" if condition else ""
        op.execute(f"CREATE TRIGGER tr_{queue} AFTER INSERT ON {table} FOR EACH ROW{when}"
                   f" EXECUTE FUNCTION {queue}_add()")  # fmt: skip
        return
    when = f" WHEN {condition}" if condition else ""
    op.execute(f"CREATE TRIGGER tr_{queue} AFTER INSERT ON {table} FOR EACH ROW{when} BEGIN {insert} END")


def downgrade() -> None:
    op.execute("ALTER TABLE rollout_devices DROP COLUMN evidence_seq")
    op.execute("ALTER TABLE rollouts DROP COLUMN evaluations")
    op.add_column("metric_windows", sa.Column("folded", sa.Boolean(), server_default=sa.false(), nullable=False))
    for table, (queue, column, _) in QUEUES.items():
        op.execute(f"DROP TRIGGER tr_{queue}" + (f" ON {table}" if op.get_bind().dialect.name == "postgresql" else ""))
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP FUNCTION {queue}_add()")
        op.execute(f"UPDATE {table} SET folded = id NOT IN (SELECT {column} FROM {queue})")  # noqa: S608
        unfolded = sa.text("NOT folded")
        op.create_index(f"ix_{table}_unfolded", table, ["id"], postgresql_where=unfolded, sqlite_where=unfolded)
        op.drop_table(queue)

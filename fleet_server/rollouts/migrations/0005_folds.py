"""Folded telemetry: rollups per wave cohort, device evidence, and the folded marks on raw rows.

Revision ID: 0005
Revises: 0003

Existing telemetry rows are marked folded except the ones an active rollout may still need (its
model's windows and install/heartbeat events since its current wave started), which the engine folds
on its first tick after the upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUMMARY_TIMES = ("last_report_at", "last_on_target_at", "left_target_at")
# The earliest start of an active rollout's current wave, per model (NULL: no wave started).
WAVE_STARTS = (
    "SELECT r.model_name, MIN(w.started_at) AS since FROM rollouts r JOIN rollout_waves w"
    ' ON w.rollout_id = r.id AND w."index" = r.current_wave'
    " WHERE r.state IN ('running', 'paused', 'awaiting_approval') GROUP BY r.model_name"
)


def upgrade() -> None:
    for table in ("metric_windows", "device_events"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("folded", sa.Boolean(), server_default=sa.false(), nullable=False))
            unfolded = sa.text("NOT folded")
            batch_op.create_index(f"ix_{table}_unfolded", ["id"], postgresql_where=unfolded, sqlite_where=unfolded)
    op.execute(f"UPDATE metric_windows SET folded = NOT EXISTS (SELECT 1 FROM ({WAVE_STARTS}) s WHERE"  # noqa: S608
               " s.model_name = metric_windows.model_name AND metric_windows.window_end > s.since)")  # fmt: skip
    op.execute("UPDATE device_events SET folded = type NOT IN ('install', 'heartbeat') OR NOT EXISTS ("  # noqa: S608
               f"SELECT 1 FROM ({WAVE_STARTS}) s WHERE device_events.at > s.since)")  # fmt: skip
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("evidence", sa.JSON(), nullable=True))
        for column in SUMMARY_TIMES:
            batch_op.add_column(sa.Column(column, sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("failure", sa.Text(), nullable=True))
    op.create_table(
        "rollout_rollups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("wave_index", sa.Integer(), nullable=False),
        sa.Column("cohort", sa.String(length=16), nullable=False),
        sa.Column("bundle_version", sa.Integer(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("invalid_windows", sa.Integer(), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("merged", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_rollout_rollups_rollout_id_rollouts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_rollups")),
        sa.UniqueConstraint(
            "rollout_id",
            "wave_index",
            "cohort",
            "bundle_version",
            name=op.f("uq_rollout_rollups_rollout_id_wave_index_cohort_bundle_version"),
        ),  # fmt: skip
    )


def downgrade() -> None:
    op.drop_table("rollout_rollups")
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        for column in ("evidence", *SUMMARY_TIMES, "failure"):
            batch_op.drop_column(column)
    for table in ("device_events", "metric_windows"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"ix_{table}_unfolded")
            batch_op.drop_column("folded")

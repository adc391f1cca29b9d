"""Telemetry tables: drift monitors and drift alerts.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "drift_monitors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("warn_psi", sa.Float(), nullable=False),
        sa.Column("alert_psi", sa.Float(), nullable=False),
        sa.Column("lookback_s", sa.Integer(), nullable=False),
        sa.Column("min_rows", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_monitors")),
        sa.UniqueConstraint("model_name", name=op.f("uq_drift_monitors_model_name")),
    )
    op.create_table(
        "drift_alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("bundle_version", sa.Integer(), nullable=False),
        sa.Column("feature", sa.String(length=200), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("psi", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_alerts")),
    )
    op.create_index(
        "ix_drift_alerts_model_version_feature", "drift_alerts", ["model_name", "bundle_version", "feature"]
    )
    op.create_index(op.f("ix_drift_alerts_opened_at"), "drift_alerts", ["opened_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_drift_alerts_opened_at"), table_name="drift_alerts")
    op.drop_index("ix_drift_alerts_model_version_feature", table_name="drift_alerts")
    op.drop_table("drift_alerts")
    op.drop_table("drift_monitors")

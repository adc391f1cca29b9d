"""Each device's share of a rollup, so that gates can bound what one device weighs.

Revision ID: 0013
Revises: 0012

A gate read the sum of every window of a wave's devices; a window may claim up to 10^12 requests,
so one device could outweigh all the others (ADR 0015). ``rollout_device_sums`` keeps, per rollout,
wave, cohort (``wave`` or ``control``), version and device, the sum of that device's windows counted in
the rollup and its sample counts, which the fold adds to as windows arrive and an evaluation reads to
find and bound the devices that claim far more than the median device.

Windows folded before this revision are in the rollups only: for a wave running across the upgrade,
they count at full weight (the sums start with what arrives after it). On PostgreSQL the table keeps
half of each page free, like ``rollout_devices`` (``0010``): each tick rewrites the rows of the devices
that reported, and free room keeps those updates on their page (HOT).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollout_device_sums",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("wave_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("cohort", sa.String(length=16), nullable=False),
        sa.Column("bundle_version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("device_id", sa.String(length=40), nullable=False),
        sa.Column("requests", sa.Double(), nullable=False),
        sa.Column("shadow_samples", sa.Double(), nullable=False),
        sa.Column("generations", sa.Double(), nullable=False),
        sa.Column("merged", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE",
                                name=op.f("fk_rollout_device_sums_rollout_id_rollouts")),
        sa.PrimaryKeyConstraint("rollout_id", "wave_index", "cohort", "bundle_version", "device_id",
                                name=op.f("pk_rollout_device_sums")),
    )  # fmt: skip
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE rollout_device_sums SET (fillfactor = 50)")


def downgrade() -> None:
    op.drop_table("rollout_device_sums")

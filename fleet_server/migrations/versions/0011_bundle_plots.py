"""The converter's report plots of a bundle version, for the dashboard's bundle page.

Revision ID: 0011
Revises: 0010

``bundle_plots``: one PNG per bundle version and kind (``report``: size, metric and latency per variant
with their budgets; ``agreement``: the cross-target agreement heat maps), uploaded by
``edgefleet-convert publish --server`` after the signed publication. Deleted with their bundle record.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bundle_plots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("uploaded_by", sa.String(length=200), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name=op.f("fk_bundle_plots_bundle_id_bundles"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundle_plots")),
        sa.UniqueConstraint("bundle_id", "kind", name=op.f("uq_bundle_plots_bundle_id_kind")),
    )


def downgrade() -> None:
    op.drop_table("bundle_plots")

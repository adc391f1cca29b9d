"""Core tables: admin keys, audit log, enrollment, devices, groups, bundles, assignments, telemetry intake.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-29 12:05:57.857081
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=120), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=120), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=200), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_log_at"), ["at"], unique=False)

    op.create_table(
        "bundles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("manifest_target", sa.String(length=300), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
        sa.Column("deprecated", sa.Boolean(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundles")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_bundles_name_version")),
    )
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bundles_name"), ["name"], unique=False)

    op.create_table(
        "device_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("batch_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.String(length=40), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=True),
        sa.Column("bundle_version", sa.Integer(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_events")),
    )
    with op.batch_alter_table("device_events", schema=None) as batch_op:
        batch_op.create_index("ix_device_events_device_id_at", ["device_id", "at"], unique=False)
        batch_op.create_index(batch_op.f("ix_device_events_type"), ["type"], unique=False)

    op.create_table(
        "device_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("poll_interval_s", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_device_groups_name")),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("hw_class", sa.String(length=64), nullable=True),
        sa.Column("arch", sa.String(length=32), nullable=True),
        sa.Column("os", sa.String(length=32), nullable=True),
        sa.Column("python", sa.String(length=32), nullable=True),
        sa.Column("agent_version", sa.String(length=32), nullable=True),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column("disk_free_mb", sa.Integer(), nullable=True),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("installed", sa.JSON(), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("public_key", name=op.f("uq_devices_public_key")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_devices_token_hash")),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_devices_arch"), ["arch"], unique=False)
        batch_op.create_index(batch_op.f("ix_devices_fleet"), ["fleet"], unique=False)
        batch_op.create_index(batch_op.f("ix_devices_hw_class"), ["hw_class"], unique=False)
        batch_op.create_index(batch_op.f("ix_devices_status"), ["status"], unique=False)

    op.create_table(
        "enrollment_nonces",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_enrollment_nonces")),
    )
    with op.batch_alter_table("enrollment_nonces", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrollment_nonces_expires_at"), ["expires_at"], unique=False)

    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=120), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrollment_tokens_token_hash")),
    )
    op.create_table(
        "metric_windows",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("batch_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.String(length=40), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("bundle_version", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_windows")),
    )
    with op.batch_alter_table("metric_windows", schema=None) as batch_op:
        batch_op.create_index("ix_metric_windows_device_id_start", ["device_id", "window_start"], unique=False)
        batch_op.create_index(
            "ix_metric_windows_model_version_start", ["model_name", "bundle_version", "window_start"], unique=False
        )

    op.create_table(
        "prediction_samples",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("batch_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.String(length=40), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("bundle_version", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prediction_samples")),
    )
    with op.batch_alter_table("prediction_samples", schema=None) as batch_op:
        batch_op.create_index("ix_prediction_samples_device_id_at", ["device_id", "at"], unique=False)
        batch_op.create_index(
            "ix_prediction_samples_model_version_at", ["model_name", "bundle_version", "at"], unique=False
        )

    op.create_table(
        "saved_filters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("expression", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_saved_filters")),
        sa.UniqueConstraint("name", name=op.f("uq_saved_filters_name")),
    )
    op.create_table(
        "telemetry_batches",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.String(length=40), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry_batches")),
        sa.UniqueConstraint("device_id", "batch_id", name=op.f("uq_telemetry_batches_device_id_batch_id")),
    )
    with op.batch_alter_table("telemetry_batches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_telemetry_batches_received_at"), ["received_at"], unique=False)

    op.create_table(
        "assignments",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.String(length=40), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("bundle_version", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=100), nullable=True),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("shadow_version", sa.Integer(), nullable=True),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("start_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_assignments_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignments")),
        sa.UniqueConstraint("device_id", "model_name", name=op.f("uq_assignments_device_id_model_name")),
    )
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_assignments_model_name"), ["model_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_assignments_rollout_id"), ["rollout_id"], unique=False)

    op.create_table(
        "device_group_members",
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_group_members_device_id_devices"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["device_groups.id"],
            name=op.f("fk_device_group_members_group_id_device_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "device_id", name=op.f("pk_device_group_members")),
    )
    with op.batch_alter_table("device_group_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_group_members_device_id"), ["device_id"], unique=False)

    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(length=40), nullable=False),
        sa.Column("tag", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_tags_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("device_id", "tag", name=op.f("pk_device_tags")),
    )
    with op.batch_alter_table("device_tags", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_tags_tag"), ["tag"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("device_tags", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_tags_tag"))

    op.drop_table("device_tags")
    with op.batch_alter_table("device_group_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_group_members_device_id"))

    op.drop_table("device_group_members")
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_assignments_rollout_id"))
        batch_op.drop_index(batch_op.f("ix_assignments_model_name"))

    op.drop_table("assignments")
    with op.batch_alter_table("telemetry_batches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_telemetry_batches_received_at"))

    op.drop_table("telemetry_batches")
    op.drop_table("saved_filters")
    with op.batch_alter_table("prediction_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_prediction_samples_model_version_at")
        batch_op.drop_index("ix_prediction_samples_device_id_at")

    op.drop_table("prediction_samples")
    with op.batch_alter_table("metric_windows", schema=None) as batch_op:
        batch_op.drop_index("ix_metric_windows_model_version_start")
        batch_op.drop_index("ix_metric_windows_device_id_start")

    op.drop_table("metric_windows")
    op.drop_table("enrollment_tokens")
    with op.batch_alter_table("enrollment_nonces", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrollment_nonces_expires_at"))

    op.drop_table("enrollment_nonces")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_status"))
        batch_op.drop_index(batch_op.f("ix_devices_hw_class"))
        batch_op.drop_index(batch_op.f("ix_devices_fleet"))
        batch_op.drop_index(batch_op.f("ix_devices_arch"))

    op.drop_table("devices")
    op.drop_table("device_groups")
    with op.batch_alter_table("device_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_events_type"))
        batch_op.drop_index("ix_device_events_device_id_at")

    op.drop_table("device_events")
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bundles_name"))

    op.drop_table("bundles")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_at"))
        batch_op.drop_index(batch_op.f("ix_audit_log_action"))

    op.drop_table("audit_log")
    op.drop_table("api_keys")

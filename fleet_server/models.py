"""Core tables of the fleet server (schema revision ``0001``).

Admin side: ``api_keys`` (hashed, with a role), ``audit_log`` (every mutation, before/after),
``enrollment_tokens``. Devices: ``devices`` (identity, status, hashed access token, inventory as
JSON plus indexed columns for filtering), ``device_tags``, ``device_groups`` and
``device_group_members`` (static groups, with an optional poll interval override),
``saved_filters``. Registry: ``bundles`` (records derived from accepted TUF targets), ``bundle_plots``
(the converter's report plots of a version, uploaded for the dashboard: revision ``0011``).
Desired state: ``assignments`` (one row per device and model; written by admins and by the rollout
engine, read by the desired-state endpoint). Telemetry intake (raw rows; payloads are opaque JSON
whose shapes ``docs/telemetry.md`` defines): ``telemetry_batches`` (idempotency by device and batch
id), ``device_events``, ``metric_windows``, ``prediction_samples``.

Persisted strings (roles, statuses, event types) are stable and lowercase.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db import Base, utcnow

ROLES = ("admin", "operator", "viewer")
DEVICE_STATUSES = ("pending", "accepted", "rejected", "decommissioned")

# BIGINT on PostgreSQL, INTEGER on SQLite (so that it stays an auto-incrementing rowid there).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class ApiKey(Base):
    """An admin API key; only its sha256 is stored, the secret is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(120))
    revoked_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]


class AuditEntry(Base):
    """One mutation: who (actor), what (action on a target), when, and the state before/after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(120))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(200))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class EnrollmentToken(Base):
    """A fleet enrollment token (hashed) that devices present once to enroll."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(120))
    expires_at: Mapped[dt.datetime]
    max_uses: Mapped[int | None]
    uses: Mapped[int] = mapped_column(default=0)
    revoked_at: Mapped[dt.datetime | None]


class EnrollmentNonce(Base):
    """A single-use challenge a device signs to prove it holds its Ed25519 private key."""

    __tablename__ = "enrollment_nonces"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)


class Device(Base):
    """An enrolled device: identity, status, hashed access token and the latest inventory."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    hw_class: Mapped[str | None] = mapped_column(String(64), index=True)
    arch: Mapped[str | None] = mapped_column(String(32), index=True)
    os: Mapped[str | None] = mapped_column(String(32))
    python: Mapped[str | None] = mapped_column(String(32))
    agent_version: Mapped[str | None] = mapped_column(String(32))
    memory_mb: Mapped[int | None]
    disk_free_mb: Mapped[int | None]
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    installed: Mapped[list[Any]] = mapped_column(JSON, default=list)
    enrolled_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DeviceTag(Base):
    """A free-form label on a device (``site=berlin``, ``canary``)."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)


class DeviceGroup(Base):
    """A static group of devices; ``poll_interval_s`` overrides the fleet default for its members."""

    __tablename__ = "device_groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    poll_interval_s: Mapped[int | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DeviceGroupMember(Base):
    """Membership of a device in a static group."""

    __tablename__ = "device_group_members"

    group_id: Mapped[int] = mapped_column(ForeignKey("device_groups.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True)


class SavedFilter(Base):
    """A named device filter expression (a dynamic group), e.g. ``hw=pi4 and runtime=onnxruntime>=1.20``."""

    __tablename__ = "saved_filters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    expression: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class BundleRecord(Base):
    """A published bundle version, derived from the accepted TUF targets (manifest + variants)."""

    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[int]
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    manifest_target: Mapped[str] = mapped_column(String(300))
    variants: Mapped[list[Any]] = mapped_column(JSON)
    deprecated: Mapped[bool] = mapped_column(default=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class BundlePlot(Base):
    """One of the converter's report plots of a bundle version (PNG), shown on the dashboard's bundle page.

    Display only: the plots carry timings, so they are not part of the signed bundle (whose bytes are
    reproducible) and never reach a device; an operator's key uploads them after the signed publication.
    """

    __tablename__ = "bundle_plots"
    __table_args__ = (UniqueConstraint("bundle_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    png: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    uploaded_by: Mapped[str] = mapped_column(String(200))
    uploaded_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Assignment(Base):
    """What one device should run for one model: the desired-state endpoint reads these rows.

    Written by admins (pins) and by the rollout engine (``rollout_id``); ``updated_at`` must change on
    every write because it feeds the desired-state ETag.
    """

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("device_id", "model_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(100), index=True)
    bundle_version: Mapped[int]
    variant: Mapped[str | None] = mapped_column(String(100))
    rollout_id: Mapped[int | None] = mapped_column(index=True)
    shadow_version: Mapped[int | None]
    pinned: Mapped[bool] = mapped_column(default=False)
    start_after: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TelemetryBatch(Base):
    """One accepted telemetry upload; the unique (device, batch id) makes retries idempotent."""

    __tablename__ = "telemetry_batches"
    __table_args__ = (UniqueConstraint("device_id", "batch_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(40))
    batch_id: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    events: Mapped[int] = mapped_column(default=0)
    windows: Mapped[int] = mapped_column(default=0)
    samples: Mapped[int] = mapped_column(default=0)
    size_bytes: Mapped[int] = mapped_column(default=0)


class DeviceEvent(Base):
    """An event from a device (install steps, heartbeats, rollbacks); payload shape in docs/telemetry.md."""

    __tablename__ = "device_events"
    __table_args__ = (Index("ix_device_events_device_id_at", "device_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_pk: Mapped[int] = mapped_column(BigId)
    device_id: Mapped[str] = mapped_column(String(40))
    type: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str | None] = mapped_column(String(100))
    bundle_version: Mapped[int | None]
    at: Mapped[dt.datetime]
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    folded: Mapped[bool] = mapped_column(default=False, server_default=false())
    """True for the event types the rollout engine never reads (intake's choice); an event stored with False is
    queued for the engine's fold by an insert trigger (``unfolded_events``, see ``fleet_server.rollouts.fold``)."""


class MetricWindow(Base):
    """A per-window metric summary from one device for one model version (opaque payload)."""

    __tablename__ = "metric_windows"
    __table_args__ = (
        Index("ix_metric_windows_model_version_start", "model_name", "bundle_version", "window_start"),
        Index("ix_metric_windows_device_id_start", "device_id", "window_start"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_pk: Mapped[int] = mapped_column(BigId)
    device_id: Mapped[str] = mapped_column(String(40))
    model_name: Mapped[str] = mapped_column(String(100))
    bundle_version: Mapped[int]
    window_start: Mapped[dt.datetime]
    window_end: Mapped[dt.datetime]
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class PredictionSample(Base):
    """A sampled prediction log with its capture reason (opaque payload)."""

    __tablename__ = "prediction_samples"
    __table_args__ = (
        Index("ix_prediction_samples_model_version_at", "model_name", "bundle_version", "at"),
        Index("ix_prediction_samples_device_id_at", "device_id", "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_pk: Mapped[int] = mapped_column(BigId)
    device_id: Mapped[str] = mapped_column(String(40))
    model_name: Mapped[str] = mapped_column(String(100))
    bundle_version: Mapped[int]
    reason: Mapped[str] = mapped_column(String(32))
    at: Mapped[dt.datetime]
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)

"""Rollout tables (schema revisions ``0003``, ``0005``, ``0012`` and ``0013``).

- ``rollouts``: one row per rollout: the target bundle (model, version), the state, the policy (waves,
  gates, soak, timeouts, breach action, approval, download pacing) as JSON, and what was targeted.
- ``rollout_waves``: one row per wave: its spec, state, clock (started, settled, finished, deadline)
  and the latest evaluation (gate values, device counts), rewritten on every tick.
- ``rollout_devices``: every device the target set named, with why it is in or out (``member``,
  ``incompatible``, ``pinned``, ``excluded``), its wave, chosen variant, the tuple it ran before
  (for rollback), its release and start-after times and its outcome in the wave.
- ``rollout_decisions``: append-only decision records: who (``engine`` or an admin key), what
  action, from which state to which, why, and the numbers that drove it.
- ``rollout_rollups`` (``0005``): per wave, cohort and version, the running sum of the metric windows
  the engine has folded in (``.fold``), so that a tick reads a few rows instead of every window; each
  rollout device's ``evidence`` (also ``0005``) is what it reported since its release, folded the
  same way.
- ``unfolded_windows``, ``unfolded_events`` (``0012``): the ids of the metric windows and events the
  fold has not added yet, put there by insert triggers on ``metric_windows`` and ``device_events``
  and deleted by the fold as it adds them. ``rollouts.evaluations`` counts a rollout's evaluations and
  ``rollout_devices.evidence_seq`` is that count when the device's evidence last changed: the next
  evaluation classifies only the devices stamped with its number (and those whose timeout has come).
- ``rollout_device_sums`` (``0013``): each device's own share of a rollup (the sum of its windows counted
  there, and its sample counts), so that gates can bound what one device weighs (``.weights``).

Everything the engine needs to resume after a restart is in these rows; nothing lives in memory.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Double, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db import Base, utcnow
from fleet_server.models import BigId

MEMBERSHIPS = ("member", "incompatible", "pinned", "excluded")


class Rollout(Base):
    """A rollout of one bundle version to a target set of devices."""

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_model_name_state", "model_name", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(100))
    bundle_version: Mapped[int]
    state: Mapped[str] = mapped_column(String(32), index=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    current_wave: Mapped[int] = mapped_column(default=0)
    created_by: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    state_changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    evaluated_at: Mapped[dt.datetime | None]
    evaluations: Mapped[int] = mapped_column(default=0, server_default="0")
    """How many evaluations ran (``.engine``): the fold stamps changed evidence with it (``evidence_seq``)."""


class RolloutWave(Base):
    """One wave of a rollout."""

    __tablename__ = "rollout_waves"
    __table_args__ = (UniqueConstraint("rollout_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    index: Mapped[int]
    spec: Mapped[str] = mapped_column(String(32))
    shadow: Mapped[bool] = mapped_column(default=False)
    state: Mapped[str] = mapped_column(String(16))
    planned_devices: Mapped[int] = mapped_column(default=0)
    started_at: Mapped[dt.datetime | None]
    settled_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    deadline_at: Mapped[dt.datetime | None]
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RolloutDevice(Base):
    """A device named by a rollout's target set: in the rollout (with its wave) or listed as out, with why."""

    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_rollout_id_wave_index", "rollout_id", "wave_index"),)

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(40), primary_key=True, index=True)
    membership: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    wave_index: Mapped[int | None]
    variant: Mapped[str | None] = mapped_column(String(100))
    previous_version: Mapped[int | None]
    previous_variant: Mapped[str | None] = mapped_column(String(100))
    previous_rollout_id: Mapped[int | None]
    released_at: Mapped[dt.datetime | None]
    start_after: Mapped[dt.datetime | None]
    running_since: Mapped[dt.datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))
    outcome_reason: Mapped[str] = mapped_column(Text, default="")
    outcome_at: Mapped[dt.datetime | None]
    restored_at: Mapped[dt.datetime | None]
    evidence: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """What the device reported since its release, folded in as it arrives (``.fold``, ``.observe``)."""
    last_report_at: Mapped[dt.datetime | None]
    last_on_target_at: Mapped[dt.datetime | None]
    left_target_at: Mapped[dt.datetime | None]
    failure: Mapped[str | None] = mapped_column(Text)
    """The evidence as the tick classifies it (kept by the fold beside ``evidence`` and ``running_since``)."""
    evidence_seq: Mapped[int] = mapped_column(default=0, server_default="0")
    """The rollout's ``evaluations`` when the fold last changed this evidence (or the engine released the device):
    the evaluation of that number classifies the device again."""


class RolloutRollup(Base):
    """The sum of the metric windows of one cohort of a wave, on one bundle version, kept as windows arrive.

    ``cohort`` is ``wave`` (devices released in the wave, on the version they were told to run) or
    ``control`` (members not released yet, on their previous version, since the wave started).
    """

    __tablename__ = "rollout_rollups"
    __table_args__ = (UniqueConstraint("rollout_id", "wave_index", "cohort", "bundle_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    wave_index: Mapped[int]
    cohort: Mapped[str] = mapped_column(String(16))
    bundle_version: Mapped[int]
    windows: Mapped[int] = mapped_column(default=0)
    invalid_windows: Mapped[int] = mapped_column(default=0)
    devices: Mapped[int] = mapped_column(default=0)
    merged: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RolloutDeviceSum(Base):
    """One device's share of a ``wave`` or ``control`` rollup: the sum of the windows of its that were counted there.

    Kept by the fold beside the rollup (the same windows, added once), so that an evaluation can find
    the devices that claim far more than the others and count them at a bounded weight
    (:mod:`.weights`) without reading any window again. The sample counts are their own columns (as
    floats: sums of counts of up to 10^12 a window) for the evaluation to read them without the JSON.
    A wave's variant cohorts use its ``wave`` rows (a device runs one variant).
    """

    __tablename__ = "rollout_device_sums"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    wave_index: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    cohort: Mapped[str] = mapped_column(String(16), primary_key=True)
    bundle_version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    device_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    requests: Mapped[float] = mapped_column(Double)
    shadow_samples: Mapped[float] = mapped_column(Double)
    generations: Mapped[float] = mapped_column(Double)
    merged: Mapped[dict[str, Any]] = mapped_column(JSON)


class UnfoldedWindow(Base):
    """The id of a metric window the fold has not added yet (queued by an insert trigger, ``0012``)."""

    __tablename__ = "unfolded_windows"

    window_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)


class UnfoldedEvent(Base):
    """The id of a device event the fold has not added yet (queued by an insert trigger, ``0012``)."""

    __tablename__ = "unfolded_events"

    event_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)


class RolloutDecision(Base):
    """An append-only decision record: every advance, pause, approval and rollback, with its numbers."""

    __tablename__ = "rollout_decisions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(120))
    action: Mapped[str] = mapped_column(String(32))
    wave_index: Mapped[int | None]
    from_state: Mapped[str] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    record: Mapped[dict[str, Any]] = mapped_column(JSON)

"""The rollout engine: staged, gated, automatic rollouts and rollbacks of bundles across the fleet.

Pure core (no database): :mod:`.states` (transition tables), :mod:`.spec` (parsing waves, durations,
policies), :mod:`.cohorts` (deterministic cohorts, download pacing), :mod:`.gates` (gate parsing and
evaluation), :mod:`.decisions` (per-device outcomes and the wave decision). Around it: :mod:`.models`
(tables, migration ``0003``), :mod:`.targets` (target sets and compatibility), :mod:`.observe` (device
progress from telemetry), :mod:`.assign` (the ``assignments`` writer), :mod:`.service` (create and
manual controls), :mod:`.engine` (the evaluation loop), :mod:`.views`, :mod:`.api` (admin HTTP API)
and :mod:`.cli` (``edgefleet-server rollout ...``). User documentation: ``docs/rollouts.md``.
"""

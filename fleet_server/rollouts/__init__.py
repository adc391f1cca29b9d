"""The rollout engine: staged, gated, automatic rollouts and rollbacks of bundles across the fleet.

Pure core (no database): :mod:`.states` (transition tables), :mod:`.spec` (parsing waves, durations,
policies), :mod:`.cohorts` (deterministic cohorts), :mod:`.gates` (gate parsing and evaluation),
:mod:`.decisions` (per-device outcomes and the wave decision). Around it: :mod:`.models` (tables),
:mod:`.service` (create and manual controls), :mod:`.engine` (the periodic evaluation loop),
:mod:`.api` (admin HTTP API) and :mod:`.cli` (``edgefleet-server rollout ...``).
"""

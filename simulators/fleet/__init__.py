"""``edgefleet-sim``: virtual fleets against a real fleet server, with faults, and their reports.

Modules, in the order a run uses them: :mod:`.scenario` (TOML scenario files), :mod:`.server` (the
server processes, the operator and the release workstation), :mod:`.device` (one virtual device on the
agent's real client code), :mod:`.net` (load balancer and network faults), :mod:`.behaviour` (the
inference shortcut), :mod:`.profiles` (hardware), :mod:`.runner` (the run and the timeline),
:mod:`.worker` (a simulator process: its shard of the fleet on its own event loop), :mod:`.report`
(terminal summary, JSON, PNG and HTML) and :mod:`.cli`. See ``docs/simulator.md``.
"""

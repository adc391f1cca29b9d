"""Fleet-side telemetry: aggregation of device metric windows, drift monitors and alerts.

``query`` turns the raw rows that intake stores (``metric_windows``, ``prediction_samples``,
``device_events``) into aggregates (per device, per bundle version, fleet-wide) and cohort numbers
for rollout gates; ``drift`` computes PSI against the bundle's baseline; ``monitors`` evaluates the
drift monitors and records alerts; ``api`` and ``cli`` list them.
"""

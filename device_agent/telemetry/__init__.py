"""Device telemetry: metric windows, sampled prediction logs, the offline buffer and uploads.

``recorder.TelemetryRecorder`` sees every answer of ``device_agent.serving.ServingPipeline``;
``windows`` counts and bins, ``sampling`` keeps samples with their provenance, ``buffer`` holds the
items in SQLite under a disk cap, ``uploader`` drains it to the fleet server. Item shapes:
``docs/telemetry.md``.
"""

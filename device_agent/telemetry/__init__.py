"""Device telemetry: metric windows, sampled prediction logs, the offline buffer and uploads.

``recorder.TelemetryRecorder`` sees every answer of ``device_agent.serving.ServingPipeline``;
``windows`` counts and bins, ``sampling`` keeps samples with their provenance, ``buffer`` holds the
items in SQLite under a disk cap, ``uploader`` drains it to the fleet server. What is dropped is
counted by ``<kind>:<reason>`` and reported in a ``drops`` event: ``cap`` (evicted for room),
``rejected`` (the server refused the batch with a 4xx), ``too_large`` (one item over the body limit),
``server_error`` (the server answered 5xx to the batch in three upload rounds while it took other
batches); an outage drops nothing. Item shapes: ``docs/telemetry.md``.
"""

"""edgefleet fleet server: enrollment, registry, TUF hosting, desired state, telemetry intake.

Entry points: :func:`fleet_server.app.create_app` (the FastAPI app) and ``edgefleet-server``
(:mod:`fleet_server.cli`). See ``fleet_server/README.md`` for the layout.
"""

__version__ = "0.1.0"

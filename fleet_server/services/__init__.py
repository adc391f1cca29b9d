"""Domain logic of the fleet server: no FastAPI imports here; errors come from ``bundles.errors``."""

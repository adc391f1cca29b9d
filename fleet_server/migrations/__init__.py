"""Alembic migrations of the fleet server (see ``fleet_server.db`` for how they are run)."""

"""edgefleet: fleet_server."""

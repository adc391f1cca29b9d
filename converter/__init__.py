"""edgefleet: converter."""

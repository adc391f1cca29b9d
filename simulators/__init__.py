"""edgefleet: simulators."""

"""edgefleet: bundles."""

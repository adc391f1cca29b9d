"""edgefleet: device_agent."""

"""The cloud inference endpoint of the fleet server (``edgefleet-server inference``): see README.md."""

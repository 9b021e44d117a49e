"""rayps.deploy."""

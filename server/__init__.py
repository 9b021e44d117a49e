"""rayps.server."""

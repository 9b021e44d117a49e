"""rayps.worker."""

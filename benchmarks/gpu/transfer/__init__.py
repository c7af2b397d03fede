"""Optional packing for a machine reached through a size-limited transfer (no registry)."""

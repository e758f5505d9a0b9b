"""vheads.data."""

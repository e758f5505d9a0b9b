"""vheads.capture."""

"""vheads.analysis."""

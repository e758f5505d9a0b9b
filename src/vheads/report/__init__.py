"""vheads.report."""

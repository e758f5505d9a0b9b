"""vheads.models."""

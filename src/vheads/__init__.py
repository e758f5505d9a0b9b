"""vheads: find and test the attention heads vision-language models use to look at images."""

__version__ = "0.1.0"

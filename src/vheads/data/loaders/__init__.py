"""One module per benchmark; each exposes `LOADER`, registered by `vheads.data.registry`."""

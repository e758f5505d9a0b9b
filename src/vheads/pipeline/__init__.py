"""A run: its config and settings (`config`), batches through the model (`batches`), the store writer (`writer`)
and the run from the store to its summary (`run`).

Import from the module that holds a name (`vheads.pipeline.run.run`); this package imports nothing itself, and
`config` loads the model code only with a model, so a command that only reads run settings does not load torch.
"""

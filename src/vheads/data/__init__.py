"""vheads.data: benchmark loaders behind one registry, the ShapesQA generator, and scoring rules.

Every loader yields `Sample`s; records that cannot be used are skipped with one warning each and
counted in `Dataset.skipped`. `Sample.image_fn` may still raise `BadSample` at run time if an image
that passed the load-time header check fails to decode; the pipeline catches it per sample.
"""

from vheads.data.dataset import Dataset, Loader
from vheads.data.registry import describe_dataset, list_datasets, load_dataset, register
from vheads.data.sample import PROMPT_STYLES, BadSample, DataError, Sample
from vheads.data.scoring import (
    accuracy_by,
    circular_accuracy,
    extract_count,
    extract_letter,
    extract_yesno,
    pope_metrics,
    score,
    scored_record,
)
from vheads.data.shapes import shapes_samples, shapes_vocabulary, write_shapes
from vheads.data.skips import Skip

__all__ = [
    "PROMPT_STYLES",
    "BadSample",
    "DataError",
    "Dataset",
    "Loader",
    "Sample",
    "Skip",
    "accuracy_by",
    "circular_accuracy",
    "describe_dataset",
    "extract_count",
    "extract_letter",
    "extract_yesno",
    "list_datasets",
    "load_dataset",
    "pope_metrics",
    "register",
    "score",
    "scored_record",
    "shapes_samples",
    "shapes_vocabulary",
    "write_shapes",
]

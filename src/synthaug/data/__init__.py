"""Data: sources (load_dataset) and the splits that define the problem."""

from .dataset import UNLABELED, ImageDataset, LoadedDataset, concat
from .sources import SOURCES, load_dataset, register_source
from .splits import (
    balanced_validation,
    class_balanced_subsample,
    colored,
    every_colour,
    few_shot,
    long_tail,
    long_tail_counts,
    shot_thresholds,
)

__all__ = [
    "UNLABELED", "ImageDataset", "LoadedDataset", "concat", "SOURCES", "load_dataset", "register_source",
    "balanced_validation", "class_balanced_subsample", "colored", "every_colour", "few_shot", "long_tail", "long_tail_counts",
    "shot_thresholds",
]

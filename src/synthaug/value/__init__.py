"""Valuation: per-sample scores of a training set's usefulness to the task (UtilGen's
meta-learned weight network)."""

from .weightnet import (
    MetaWeightConfig,
    WeightNet,
    fit_meta_weighted,
    meta_gradient,
    utilities,
    weighted_loss,
)

__all__ = ["MetaWeightConfig", "WeightNet", "fit_meta_weighted", "meta_gradient", "utilities", "weighted_loss"]

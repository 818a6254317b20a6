"""Selection and validation of synthetic data (the survey's data-selection and validation
modules): feature extractors, selection filters, set metrics, and their pipeline stages."""

from .features import FEATURES, PretrainedEncoder, feature_extractor, register_features
from .filters import (
    SELECTORS,
    agreement,
    cluster_representatives,
    confidence,
    register_selector,
    top_k_per_class,
)
from .metrics import (
    density_coverage,
    diversity,
    diversity_ratio,
    domain_gap,
    frechet_distance,
    kernel_distance,
    memorization_ratio,
    precision_recall,
    realism_scores,
    set_metrics,
)
from .stage import overgenerate_plan, select_stage, validation_stage

__all__ = [
    "FEATURES", "SELECTORS", "PretrainedEncoder", "agreement", "cluster_representatives", "confidence",
    "density_coverage", "diversity", "diversity_ratio", "domain_gap", "feature_extractor", "frechet_distance", "kernel_distance",
    "memorization_ratio", "overgenerate_plan", "precision_recall", "realism_scores", "register_features",
    "register_selector", "select_stage", "set_metrics", "top_k_per_class", "validation_stage",
]

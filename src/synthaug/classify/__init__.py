"""The classifier side of the pipeline: models, the training loop, evaluation."""

from .evaluate import classification_metrics, evaluate, example_losses, predict_logits
from .models import MODELS, Classifier, create_model, register_model
from .train import (
    TrainConfig,
    TrainResult,
    extract_features,
    fit_classifier,
    refit_head,
    training_key,
)

__all__ = [
    "classification_metrics", "evaluate", "example_losses", "predict_logits", "MODELS", "Classifier", "create_model", "register_model",
    "TrainConfig", "TrainResult", "extract_features", "fit_classifier", "refit_head", "training_key",
]

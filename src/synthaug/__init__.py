"""synthaug: generative data augmentation for image classification.

    data = synthaug.load_dataset("fashion-mnist")
    train = synthaug.long_tail(data.train, ratio=100, seed=0)
    result = synthaug.fit_classifier(train, synthaug.TrainConfig(loss="balanced-softmax"))
    metrics = synthaug.evaluate(result.model, data.test, train_counts=train.class_counts())
"""

from .classify import (
    Classifier,
    TrainConfig,
    create_model,
    evaluate,
    fit_classifier,
    refit_head,
)
from .config import RunConfig, load_config
from .data import (
    ImageDataset,
    LoadedDataset,
    balanced_validation,
    class_balanced_subsample,
    colored,
    concat,
    few_shot,
    load_dataset,
    long_tail,
)
from .errors import SynthaugError
from .recipes import RECIPES
from .runs import train_run
from .task import Task, make_task

__version__ = "0.1.0"

__all__ = [
    "Classifier", "TrainConfig", "create_model", "evaluate", "fit_classifier", "refit_head", "RunConfig",
    "load_config", "ImageDataset", "LoadedDataset", "balanced_validation", "class_balanced_subsample", "colored",
    "concat", "few_shot", "load_dataset", "long_tail", "SynthaugError", "RECIPES", "train_run", "Task", "make_task",
]

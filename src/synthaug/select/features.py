"""Feature extractors: uint8 images (N, C, H, W) in, one float vector per image (N, D) out.
Selection and validation compare real and synthetic images in one of these spaces.

`feature_extractor(spec, classifier=)` turns a config value into an extractor:
- `"classifier"`: the task classifier's penultimate features (the default; the classifier
  is the one the stage has at hand: the scorer before training, the trained model after);
- `"pixels"`: the flattened pixels in [0, 1];
- a folder written by `Classifier.save_pretrained`: that classifier's features;
- `"hf:<hub id or folder>"`: a pretrained image encoder through transformers'
  `AutoModel.from_pretrained` (CLIP, DINOv2, ViT, ...; `pip install 'synthaug[encoders]'`);
- in Python, any `torch.nn.Module` (float images in [0, 1] -> features) or callable.
Add a named one with `@register_features(name)`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..classify.models import Classifier
from ..errors import SynthaugError
from ..utils.registry import Registry
from ..utils.runtime import infer, resolve_device

if TYPE_CHECKING:
    from ..data.dataset import ImageDataset

Extractor = Callable[[torch.Tensor], torch.Tensor]
FEATURES: Registry[Callable[..., Extractor]] = Registry("feature space")


def register_features(name: str):
    """Register `make(classifier=None) -> extractor` under `name`."""
    return FEATURES.register(name)


@torch.no_grad()
def module_features(module: nn.Module, images: torch.Tensor, *, batch_size: int = 256,
                    forward: Callable | None = None) -> torch.Tensor:
    """Run `module` (or `forward(module, x)`) over float images in [0, 1], in batches on the
    module's device; the outputs are flattened to one vector per image."""
    call = forward or (lambda m, x: m(x))
    return infer(module, images, lambda m, x, rows: call(m, x).flatten(1).float(), batch_size=batch_size, empty=(0, 0))


def classifier_features(model: Classifier) -> Extractor:
    return lambda images: module_features(model, images, forward=lambda m, x: m.forward_features(x))


@register_features("classifier")
def _classifier(classifier: Classifier | None = None) -> Extractor:
    if classifier is None:
        raise SynthaugError("features 'classifier' need a trained classifier here: name another feature extractor")
    return classifier_features(classifier)


@register_features("pixels")
def _pixels(classifier=None) -> Extractor:
    return lambda images: images.flatten(1).float() / 255


class PretrainedEncoder:
    """An image encoder from transformers, loaded with `from_pretrained` from a hub id or a
    local folder; its image processor (if the folder has one) resizes and normalises. Gray
    images are repeated to RGB. Features: `get_image_features` (CLIP-like models), else the
    pooled output, else the mean of the last hidden state."""

    def __init__(self, name_or_path: str, device: str = "auto", batch_size: int = 64):
        try:
            from transformers import AutoImageProcessor, AutoModel
        except ImportError as e:
            raise SynthaugError("pretrained encoders need transformers: pip install 'synthaug[encoders]'") from e
        try:
            # float32: a checkpoint saved in half precision would otherwise load as one
            self.model = AutoModel.from_pretrained(name_or_path).float().to(resolve_device(device)).eval()
        except OSError as e:
            raise SynthaugError(f"cannot load an image encoder from '{name_or_path}': give a hub id or a folder "
                                f"written by save_pretrained ({str(e).splitlines()[0]})") from e
        try:
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError):
            self.processor = None
        self.batch_size = batch_size

    def _pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if self.processor is not None:
            return self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        size = getattr(self.model.config, "image_size", None) or getattr(
            getattr(self.model.config, "vision_config", None), "image_size", images.shape[-1])
        x = images.float() / 255
        return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self._pixel_values(images[i : i + self.batch_size]).to(device)
            if hasattr(self.model, "get_image_features"):
                f = self.model.get_image_features(pixel_values=x)
                f = getattr(f, "pooler_output", f)  # transformers 5 returns an output object
            else:
                o = self.model(pixel_values=x)
                f = next((getattr(o, name) for name in ("image_embeds", "pooler_output")
                          if getattr(o, name, None) is not None), None)
                if f is None:
                    f = o.last_hidden_state.mean(1)
            out.append(f.flatten(1).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)


def check_features(spec: str, key: str = "features", used: bool = True):
    """Raise (one line) unless `spec` names a feature space: a registered one, hf:<...>, or a
    folder holding a saved classifier; where it is `used`, an hf: one needs transformers and, as
    a local folder, its config.json. Loads nothing."""
    folder = Path(spec)
    if spec.startswith("hf:"):
        import importlib.util

        if not used:
            return
        if importlib.util.find_spec("transformers") is None:
            raise SynthaugError(f"{key} {spec} needs transformers: pip install 'synthaug[encoders]'")
        local = Path(spec[3:])
        if (local.exists() or spec[3:].startswith((".", "/"))) and not (local / "config.json").is_file():
            raise SynthaugError(f"{key} is '{spec}' and that folder has no config.json: give a folder written by "
                                "save_pretrained, or a hub id")
        return
    if spec in FEATURES or ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return
    raise SynthaugError(f"{key} is '{spec}': use {', '.join(FEATURES)}, a classifier folder (save_pretrained) "
                        "or hf:<hub id or folder>")


def check_features_fit(spec: str, key: str, train: ImageDataset):
    """Refuse a classifier folder whose network cannot read `train`'s images (other channels; its
    pooling takes any size); registered and hf: feature spaces adapt to any image. Reads
    config.json; writes nothing."""
    import json

    folder = Path(spec)
    if spec in FEATURES or spec.startswith("hf:") or not (folder / "config.json").is_file():
        return
    try:
        config = json.loads((folder / "config.json").read_text())
        channels = int(config["in_channels"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise SynthaugError(f"{key}: '{folder}/config.json' is not a classifier config: point at a folder written by "
                            "save_pretrained") from None
    if channels != int(train.images.shape[1]):
        raise SynthaugError(f"{key}: the classifier in '{folder}' reads {channels}-channel images and these have "
                            f"{int(train.images.shape[1])}: give a classifier trained on this data, or the data it was "
                            "trained on (data.dataset, data.channels)")


def feature_extractor(spec: str | nn.Module | Callable = "classifier", *, classifier: Classifier | None = None,
                      device: str = "auto") -> Extractor:
    """The extractor a config value (or a Python object) names; see the module docstring."""
    if isinstance(spec, nn.Module):
        return lambda images: module_features(spec, images)
    if callable(spec):
        return spec
    if spec in FEATURES:
        return FEATURES[spec](classifier=classifier)
    if spec.startswith("hf:"):
        return PretrainedEncoder(spec[3:], device=device)
    folder = Path(spec)
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        model = Classifier.from_pretrained(folder).to(resolve_device(device))
        return classifier_features(model)
    raise SynthaugError(f"unknown feature extractor '{spec}': use {', '.join(FEATURES)}, "
                        "a classifier folder (save_pretrained) or hf:<hub id or folder>")

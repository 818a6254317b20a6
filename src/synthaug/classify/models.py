"""Classifiers. Each splits into `forward_features` (penultimate features) and `head` (a
Linear layer), so the head can be re-fitted (cRT) and features reused (selection, t-SNE).
Inputs are float images in [0, 1]; the model normalises them with its own buffers.

Add a model with `@register_model("name")` on a factory `(num_classes, in_channels,
image_size, **kwargs) -> nn.Module` that returns a `Classifier`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import SynthaugError
from ..utils.io import atomic_save_tensors, atomic_write_text
from ..utils.registry import Registry

MODELS: Registry[Callable[..., Classifier]] = Registry("model")


def register_model(name: str):
    """Register `fn(num_classes=, in_channels=, image_size=, **kwargs) -> Classifier`."""
    return MODELS.register(name)


class Classifier(nn.Module):
    """A feature extractor (`backbone`, images -> (N, D)) and a linear `head`."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, in_channels: int, config: dict):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("mean", torch.full((1, in_channels, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, in_channels, 1, 1), 0.25))
        self.config = config  # everything `create_model` needs to rebuild this model

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean.copy_(mean.view_as(self.mean))
        self.std.copy_(std.clamp(min=1e-3).view_as(self.std))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def save_pretrained(self, folder: str | os.PathLike):
        """config.json + model.safetensors, each written atomically, the weights last: a folder
        holding model.safetensors holds a whole classifier."""

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "config.json", json.dumps(self.config, indent=2))
        atomic_save_tensors(folder / "model.safetensors", {k: v.contiguous() for k, v in self.state_dict().items()})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Classifier:
        from safetensors.torch import load_file

        folder = Path(folder)
        for f in ("config.json", "model.safetensors"):
            if not (folder / f).exists():
                raise SynthaugError(f"classifier folder '{folder}' has no {f}: point at a folder written by save_pretrained")
        try:
            config = json.loads((folder / "config.json").read_text())
            model = create_model(**config)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise SynthaugError(f"classifier folder '{folder}': config.json is not a classifier config "
                                f"({str(e).splitlines()[0]}): point at a folder written by save_pretrained") from None
        try:
            model.load_state_dict(load_file(folder / "model.safetensors"))
        except Exception as e:
            raise SynthaugError(f"cannot load '{folder / 'model.safetensors'}' ({str(e).splitlines()[0]}): retrain or replace it") from None
        return model


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: int | tuple, **kwargs) -> Classifier:
    factory = MODELS.lookup(name)
    size = image_size if isinstance(image_size, int) else int(max(image_size))
    model = factory(num_classes=num_classes, in_channels=in_channels, image_size=size, **kwargs)
    model.config = dict(name=name, num_classes=num_classes, in_channels=in_channels, image_size=size, **kwargs)
    return model


def _conv_bn(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@register_model("small-cnn")
def small_cnn(num_classes, in_channels, image_size, width: int = 16) -> Classifier:
    """A VGG-style CNN for 8-32 px images (MNIST, Fashion-MNIST, digits): one conv at full
    resolution, then two stages of two 3x3 convs, global average pooling. At width 16: 70k
    parameters and 5.5M multiply-adds per 28x28 image, so it trains on a CPU (about 1,000
    images/s per core); width 32 has 4x the cost."""
    w = width
    pool = (lambda: nn.MaxPool2d(2)) if image_size >= 16 else nn.Identity
    backbone = nn.Sequential(
        _conv_bn(in_channels, w), pool(),
        _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), pool(),
        _conv_bn(2 * w, 4 * w), _conv_bn(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return Classifier(backbone, 4 * w, num_classes, in_channels, {})


class _BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model("resnet32")
def resnet32(num_classes, in_channels, image_size, depth: int = 32, width: int = 16) -> Classifier:
    """The CIFAR ResNet of He et al. 2016 (3 stages of (depth-2)/6 basic blocks, 16/32/64
    channels, 0.46M parameters), the long-tail literature's standard for CIFAR-LT."""
    if (depth - 2) % 6:
        raise SynthaugError(f"resnet depth must be 6n+2 (20, 32, 44, 56), got {depth}")
    n = (depth - 2) // 6
    layers, c = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)], width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            layers.append(_BasicBlock(c, c_out, 2 if (stage > 0 and i == 0) else 1))
            c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), c, num_classes, in_channels, {})


@register_model("resnet18")
def resnet18(num_classes, in_channels, image_size) -> Classifier:
    """torchvision's ResNet-18 (random init). For images up to 64 px the stem is the CIFAR one
    (3x3 stride-1 conv, no max-pool), as is usual for small images."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None)
    if image_size <= 64:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return Classifier(net, dim, num_classes, in_channels, {})

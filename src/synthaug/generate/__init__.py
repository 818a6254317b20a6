"""Generators: the embedded class-conditional diffusion model and Stable Diffusion through diffusers."""

from .base import Generator
from .diffusion import DiffusionGenerator
from .network import PRESETS, SAMPLERS, GeneratorConfig, GeneratorTrainConfig, SamplerConfig

__all__ = ["Generator", "PRESETS", "SAMPLERS", "DiffusionGenerator", "GeneratorConfig", "GeneratorTrainConfig", "SamplerConfig"]

"""Generators: the embedded class-conditional diffusion model and Stable Diffusion through diffusers."""

from .diffusion import (
    PRESETS,
    SAMPLERS,
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
)

__all__ = ["PRESETS", "SAMPLERS", "DiffusionGenerator", "GeneratorConfig", "GeneratorTrainConfig", "SamplerConfig"]

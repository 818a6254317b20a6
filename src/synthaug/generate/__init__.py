"""Generators: the embedded class-conditional diffusion model (and, later, Stable Diffusion)."""

from .diffusion import (
    PRESETS,
    SAMPLERS,
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
    parameter_count,
)

__all__ = ["PRESETS", "SAMPLERS", "DiffusionGenerator", "GeneratorConfig", "GeneratorTrainConfig", "SamplerConfig", "parameter_count"]

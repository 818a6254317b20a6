"""The closed sets of values that settings take, as `Literal` types: the config validates
against them, and the modules that use them read their tuples from here
(`typing.get_args`). Open sets (recipes, models, selectors, executors, generator kinds) are
registries instead, checked when a run starts."""

from typing import Literal

SplitKind = Literal["none", "long-tail", "few-shot", "colored"]
Profile = Literal["exp", "step"]  # long-tail: exponential or step profile
Preset = Literal["tiny", "small", "base"]  # the embedded generator's network sizes
Sampler = Literal["sde-dpm-solver++", "dpm-solver++", "ddim"]
Pairing = Literal["self", "class"]  # image-conditioned training: the condition image
Dtype = Literal["auto", "float32", "float16", "bfloat16"]  # Stable Diffusion's weights
Operator = Literal["image", "dropout", "mixup", "cutmix", "embed-mixup", "embed-cutmix", "embed-cutmix-dropout",
                   "label-only"]  # AugCond's conditioning operators

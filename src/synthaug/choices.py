"""The closed sets of values that settings take, as `Literal` types: the config validates
against them, and the modules that use them read their tuples from here
(`typing.get_args`). Open sets (recipes, models, selectors, executors, generator kinds) are
registries instead, checked when a run starts."""

import typing
from typing import Literal

from .errors import SynthaugError

SplitKind = Literal["none", "long-tail", "few-shot", "colored"]
TestColours = Literal["every", "drawn"]  # colored: each test image in every colour, or in one drawn colour
Profile = Literal["exp", "step"]  # long-tail: exponential or step profile
Preset = Literal["tiny", "small", "base"]  # the embedded generator's network sizes
Sampler = Literal["sde-dpm-solver++", "dpm-solver++", "ddim"]
Pairing = Literal["self", "class"]  # image-conditioned training: the condition image
GroupGuidance = Literal["joint", "composed"]  # how a group-conditioned generator guides a (class, group) cell
# arithmetic of the embedded generator and the classifier; auto: bfloat16 where the hardware
# computes it natively (utils/runtime.fast_dtype), else float32
Precision = Literal["auto", "float32", "bfloat16"]
FeedbackCriterion = Literal["entropy", "loss"]  # feedback guidance: what the sampler climbs (generate/feedback.py)
Dtype = Literal["auto", "float32", "float16", "bfloat16"]  # Stable Diffusion's weights
Operator = Literal["image", "dropout", "mixup", "cutmix", "embed-mixup", "embed-cutmix", "embed-cutmix-dropout",
                   "label-only"]  # AugCond's conditioning operators
ClassSampler = Literal["uniform", "class-balanced", "sqrt"]  # how batches draw the classes (classifier, generator)
GroupSampler = Literal["uniform", "sqrt", "balanced"]  # how the generator draws a class's (class, group) cells
GroupSamplerChoice = Literal["auto", GroupSampler]  # the run config's: auto is sqrt with groups, else uniform
CbdmDraw = Literal["frequency", "uniform"]  # how CBDM draws its other class y' (the reference code: by frequency)
Loss = Literal["ce", "logit-adjusted", "balanced-softmax"]
Mix = Literal["none", "mixup", "cutmix", "mixup-cutmix", "domain-mixup"]
GroupMethod = Literal["none", "balanced-sampling", "reweighted", "dro"]  # the (class, group) cells' treatment
SslMethod = Literal["none", "fixmatch", "freematch"]  # semi-supervised training on the unlabelled pool
HeadInit = Literal["fresh", "trained"]  # LDMLR: the head re-trained from scratch or fine-tuned


def check_choices(settings, prefix: str):
    """Raise one line for a field of dataclass `settings` whose value its `Literal` type does not
    allow (the config checks these already; this covers settings built in code)."""
    for name, kind in typing.get_type_hints(type(settings)).items():
        if typing.get_origin(kind) is Literal and getattr(settings, name) not in typing.get_args(kind):
            raise SynthaugError(f"{prefix}{name} is '{getattr(settings, name)}': use one of "
                                f"{', '.join(map(str, typing.get_args(kind)))}")

"""Non-leaking augmentation of the generator's training images (Karras et al. 2022, EDM,
appendix; CBDM's reference code trains its long-tail generators with it): each training
image is flipped, scaled, rotated, stretched and shifted, each with probability `p`, and the
network is told how (the transform's parameters, through a linear map added to the
timestep embedding). Sampling tells it "not augmented" (zeros), so the augmented views
teach the network the class's shapes from more than its few images without leaking into
what it draws. Unlike CBDM's pipeline, the x-flip is drawn with probability `p` like the
others (theirs flips half of all images: right for photos, not for digits)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

PARAMETERS = 9  # x-flip, y-flip, scale, rotation (2), anisotropy (2), translation (2)
SCALE_STD = 0.2  # log2 of the isotropic and anisotropic scales: N(0, 0.2^2), as in EDM's and CBDM's pipelines
SHIFT_STD = 0.125  # translation, as a share of the image side


def augment_images(images: torch.Tensor, p: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`images` (N, C, H, W) in [-1, 1], each transform applied with probability `p`, and the
    (N, 9) parameters the network is told (zeros where nothing was applied). Every draw is
    made whatever `p`, so a step's other random numbers do not depend on it."""
    n = len(images)
    do = torch.rand(n, 6, generator=g) < p
    flip = torch.randint(2, (n, 2), generator=g).float() * do[:, :2]
    scale = torch.randn(n, generator=g) * do[:, 2]
    rotation = (torch.rand(n, generator=g) * 2 - 1) * math.pi * do[:, 3]
    stretch_angle = (torch.rand(n, generator=g) * 2 - 1) * math.pi * do[:, 4]
    stretch = torch.randn(n, generator=g) * do[:, 4]
    shift = torch.randn(n, 2, generator=g) * do[:, 5:6]
    parameters = torch.stack([flip[:, 0], flip[:, 1], scale, rotation.cos() - 1, rotation.sin(),
                              stretch * stretch_angle.cos(), stretch * stretch_angle.sin(), shift[:, 0], shift[:, 1]], 1)
    told = parameters.ne(0).any(1)  # the others keep their exact pixels
    if not bool(told.any()):
        return images, parameters
    warped = warp(images, flip, scale, rotation, stretch_angle, stretch, shift)
    return torch.where(told.to(images.device)[:, None, None, None], warped, images), parameters


def warp(images: torch.Tensor, flip, scale, rotation, stretch_angle, stretch, shift) -> torch.Tensor:
    """`images` flipped (x, y: 0 or 1), scaled by 2^(0.2 scale), rotated by `rotation`, stretched
    by 2^(+-0.2 stretch) along `stretch_angle` and shifted by `shift` (x, y) x 1/8 of the side,
    about the centre; borders reflect (a digit's black background stays black)."""
    forward = _diagonal(1 - 2 * flip[:, 0], 1 - 2 * flip[:, 1])
    forward = forward @ _diagonal(2 ** (SCALE_STD * scale), 2 ** (SCALE_STD * scale))
    forward = forward @ _rotation(-rotation)
    forward = forward @ _rotation(stretch_angle) @ _diagonal(2 ** (SCALE_STD * stretch), 2 ** (-SCALE_STD * stretch))
    forward = forward @ _rotation(-stretch_angle)
    forward[:, :2, 2] = 2 * SHIFT_STD * shift  # in grid_sample's [-1, 1] coordinates
    # each output pixel reads the input where the inverse transform takes it
    grid = F.affine_grid(torch.linalg.inv(forward)[:, :2].to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.device), mode="bilinear", padding_mode="reflection", align_corners=False)


def _diagonal(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(len(sx), 3, 3)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, 1
    return m


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(len(theta), 3, 3)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = theta.cos(), -theta.sin(), theta.sin(), theta.cos(), 1
    return m


class AugmentEmbedding(torch.nn.Module):
    """The transform's parameters mapped into the timestep embedding (no bias: "not augmented",
    all zeros, adds nothing, so the trained UNet samples without this module). It joins the
    UNet through a forward hook on its timestep embedding while training."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(PARAMETERS, dim, bias=False)
        self.parameters_now: torch.Tensor | None = None

    def attach(self, unet) -> torch.utils.hooks.RemovableHandle:
        def add(module, inputs, output):
            if self.parameters_now is None:
                return output
            return output + self.linear(self.parameters_now.to(output.device, output.dtype))

        return unet.time_embedding.register_forward_hook(add)


@contextmanager
def told(augment: AugmentEmbedding | None, unet):
    """`augment` attached to `unet` inside the block (nothing when None), detached however it ends."""
    handle = None if augment is None else augment.attach(unet)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()

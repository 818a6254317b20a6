"""Image conditioning for the embedded generator (augmentation-conditioned generation, seed 002).

The generator can take, besides the class, the embedding of a real image from a fixed
encoder. At generation time that image is an *augmented* real image of the class (or a mix
of two), so the samples stay in the domain of the real data yet differ from any one image.

- `PCAEncoder`: the fixed encoder. Principal components of the generator's training images
  (labelled and unlabelled), whitened; fitted once with the generator and frozen. A
  stand-in for the CLIP image encoder of the paper's unCLIP model; any module mapping uint8
  images to vectors can replace it.
- `ConditionEmbedding`: class (x group) embedding + a projection of the image embedding,
  with a learned null vector when the image is dropped, fed to the UNet as its class
  embedding (`class_embed_type="identity"`).
- `condition_embeddings`: the paper's conditioning operators, in pixel space (the image,
  Mixup, CutMix of two images of the same class) and in embedding space (Dropout,
  Embed-Mixup, Embed-CutMix, Embed-CutMix-Dropout), each drawn from a row's own seed.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from ..choices import Operator
from ..errors import SynthaugError

# conditioning modes: "label-only" is class conditioning with the image dropped (the baseline)
OPERATORS = get_args(Operator)
TWO_IMAGE_OPERATORS = ("mixup", "cutmix", "embed-mixup", "embed-cutmix", "embed-cutmix-dropout")


class PCAEncoder(nn.Module):
    """Whitened principal components of flattened images in [-1, 1]: a fixed, deterministic
    encoder that costs one matrix product."""

    def __init__(self, input_dim: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("components", torch.zeros(dim, input_dim))
        self.register_buffer("scale", torch.ones(dim))

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    @property
    def active_dims(self) -> int:
        """Coordinates that carry information (fewer than `dim` when fitted on few images)."""
        return int((self.components.abs().sum(1) > 0).sum())

    @torch.no_grad()
    def fit(self, images: torch.Tensor, seed: int = 0, max_images: int = 20000) -> PCAEncoder:
        x = _flat(images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images]])
        if len(x) < 2:
            raise SynthaugError("the image encoder needs at least 2 images to fit")
        mean = x.mean(0)
        q = min(self.dim, len(x) - 1, x.shape[1])
        with torch.random.fork_rng():  # the randomised SVD draws from the global generator: seed it, leave it
            torch.manual_seed(seed)
            _, s, v = torch.pca_lowrank(x - mean, q=q, center=False, niter=4)
        self.mean.copy_(mean)
        self.components.zero_()
        self.components[:q] = v[:, :q].T
        self.scale.fill_(1.0)
        self.scale[:q] = (s[:q] / (len(x) - 1) ** 0.5).clamp(min=1e-6)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) or float in [-1, 1] -> (N, dim) embeddings, about unit variance."""
        x = _flat(images).to(self.mean.device)
        return (x - self.mean) @ self.components.T / self.scale

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, dim) -> (N, input_dim) in [-1, 1] space: the low-rank reconstruction."""
        return (embeddings.to(self.mean.device) * self.scale) @ self.components + self.mean


def _flat(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    return x.reshape(len(x), -1)




class ConditionEmbedding(nn.Module):
    """The vector added to the UNet's timestep embedding: the (class, group) cell's embedding
    plus the projected image embedding, or a learned null vector where the image is dropped."""

    def __init__(self, num_cells: int, image_dim: int, out_dim: int):
        super().__init__()
        self.cells = nn.Embedding(num_cells, out_dim)
        self.image_proj = nn.Sequential(nn.Linear(image_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.null_image = nn.Parameter(torch.zeros(out_dim))

    def forward(self, cell_ids: torch.Tensor, image_embeds: torch.Tensor | None, keep: torch.Tensor | None = None):
        out = self.cells(cell_ids)
        if image_embeds is None:
            return out + self.null_image
        image = self.image_proj(image_embeds.to(out.dtype))
        if keep is not None:
            image = torch.where(keep[:, None], image, self.null_image)
        return out + image


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset of up to `max_shift` px (edges padded by
    replication): the view of a training image whose embedding conditions its denoising."""
    if max_shift < 1:
        return images
    n, _, h, w = images.shape
    padded = nn.functional.pad(images.float(), (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)]).to(images.dtype)


def cutmix_box(h: int, w: int, lam: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """A box of area about (1 - lam) * h * w at a random centre, clipped to the image."""
    cut = (1 - lam) ** 0.5
    bh, bw = int(round(h * cut)), int(round(w * cut))
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    return max(cy - bh // 2, 0), min(cy + bh // 2 + bh % 2, h), max(cx - bw // 2, 0), min(cx + bw // 2 + bw % 2, w)


@torch.no_grad()
def condition_embeddings(encoder: nn.Module, first: torch.Tensor, second: torch.Tensor | None, modes, seeds,
                         dropout: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditioning embedding of each row, and whether it keeps an image (False for
    label-only). `first`, `second`: uint8 images of the same class (`second` is used by the
    two-image operators); `modes`: one operator per row (or one for all); `seeds`: each row's
    seed, from which its mixing weight, box and dropout mask are drawn.

    Mixing weights are drawn from U(0, 1) (Beta(1, 1)); Dropout zeroes each embedding
    coordinate with probability `dropout` (zero is the mean image: the coordinate's
    information is removed, not rescaled). Embed-CutMix takes a random subset of
    round((1 - lam) * q) of the q informative coordinates from the second image: PCA
    coordinates are ordered by variance, so a contiguous run (CutMix of an unordered CLIP
    vector) would swap mostly the dominant ones or mostly nothing."""
    n = len(first)
    modes = [modes] * n if isinstance(modes, str) else list(modes)
    seeds = list(seeds)
    if len(modes) != n or len(seeds) != n:
        raise SynthaugError(f"one conditioning mode and one seed per image: got {len(modes)} modes and {len(seeds)} "
                            f"seeds for {n} images")
    unknown = set(modes) - set(OPERATORS)
    if unknown:
        raise SynthaugError(f"unknown conditioning mode '{sorted(unknown)[0]}': use one of {', '.join(OPERATORS)}")
    if any(m in TWO_IMAGE_OPERATORS for m in modes) and (second is None or len(second) != n):
        raise SynthaugError("the mixing conditioning modes need a second image of the same class per row")
    h, w = first.shape[-2:]
    pixels = first.clone()
    gens = [torch.Generator().manual_seed((int(s) * 2_654_435_761 + 97) % 2**63) for s in seeds]
    lams = [float(torch.rand((), generator=g)) for g in gens]
    for i, m in enumerate(modes):  # pixel-space operators act before the encoder
        if m == "mixup":
            pixels[i] = (lams[i] * first[i].float() + (1 - lams[i]) * second[i].float()).round().to(first.dtype)
        elif m == "cutmix":
            y0, y1, x0, x1 = cutmix_box(h, w, lams[i], gens[i])
            pixels[i, :, y0:y1, x0:x1] = second[i, :, y0:y1, x0:x1]
    device = next(encoder.buffers()).device if any(True for _ in encoder.buffers()) else "cpu"
    emb = encoder(pixels.to(device)).float().cpu()
    emb_second = encoder(second.to(device)).float().cpu() if second is not None else None
    dim = emb.shape[1]
    active = getattr(encoder, "active_dims", dim)
    for i, m in enumerate(modes):  # embedding-space operators act after it
        if m == "embed-mixup":
            emb[i] = lams[i] * emb[i] + (1 - lams[i]) * emb_second[i]
        elif m in ("embed-cutmix", "embed-cutmix-dropout"):
            swap = torch.randperm(active, generator=gens[i])[: int(round((1 - lams[i]) * active))]
            emb[i, swap] = emb_second[i, swap]
        if m in ("dropout", "embed-cutmix-dropout"):
            emb[i] = emb[i] * (torch.rand(dim, generator=gens[i]) >= dropout)
    keep = torch.tensor([m != "label-only" for m in modes], dtype=torch.bool)
    return emb, keep

"""Fixtures for tests and offline trials, shipped so that users can test their own
extensions the same way: a random miniature Stable Diffusion pipeline (text-to-image or
unCLIP), laid out like a real checkpoint. Never for images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import SynthaugError


def tiny_pipeline(folder: str | os.PathLike, *, unclip: bool = False, seed: int = 0) -> Path:
    """Write a random miniature Stable Diffusion pipeline (32 px, a few thousand weights per
    component, a 300-token byte-level CLIP tokenizer) to `folder`, laid out and loaded
    exactly like a real checkpoint: for tests and offline trials, never for images."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SynthaugError(f"'{folder}' is not a new or empty folder: the tiny pipeline is saved only into one")
    folder.mkdir(parents=True, exist_ok=True)
    dim = 32
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer(folder / "_tokenizer_files", CLIPTokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=dim, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=dim,
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, max_position_embeddings=77))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=dim,
                                attention_head_dim=(2, 4), norm_num_groups=16,
                                **(dict(class_embed_type="projection", projection_class_embeddings_input_dim=2 * dim)
                                   if unclip else {}))
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if unclip:
        from diffusers import DDPMScheduler
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        pipe = StableUnCLIPImg2ImgPipeline(
            feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
            image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=dim, projection_dim=dim, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                intermediate_size=37, patch_size=8)),
            image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=dim),
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
            tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler, vae=vae)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer_files")
    return folder


def _tiny_tokenizer(folder: Path, tokenizer_class):
    """A CLIP BPE tokenizer over single bytes (no merges), from vocab.json/merges.txt."""
    byte_chars = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [chr(b) for b in byte_chars], 0  # GPT-2's printable stand-in for each byte
    for b in range(256):
        if b not in byte_chars:
            chars.append(chr(256 + extra))
            extra += 1
    folder.mkdir(parents=True, exist_ok=True)
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tokenizer_class.from_pretrained(folder, model_max_length=77)

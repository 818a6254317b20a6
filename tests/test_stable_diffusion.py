"""Stable Diffusion through diffusers, without downloads: random miniature pipelines
(text-to-image and unCLIP) are written to a folder and loaded back the way a user's
checkpoint loads; every generation mode, the exposed policy (prompt embeddings, initial
latents), LoRA adaptation (peft) with its cache, the errors a user can hit, and each recipe
from `synthaug run` on them."""

import json
import math
import sys

import pytest
import torch
from conftest import make_dataset

from synthaug.cli import main
from synthaug.config import load_config
from synthaug.errors import SynthaugError
from synthaug.generate import SamplerConfig
from synthaug.generate.cache import generator_for, load_generator
from synthaug.generate.image_condition import OPERATORS
from synthaug.generate.stable_diffusion import StableDiffusionGenerator
from synthaug.testing import tiny_pipeline

pytest.importorskip("transformers")
SAMPLING = SamplerConfig(sampler="dpm-solver++", steps=2, guidance_scale=2.0, batch_size=4)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def unclip_folder(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("unclip") / "pipeline", unclip=True)


@pytest.fixture(scope="module")
def data():
    return make_dataset((6, 4, 3), channels=1, size=8)


@pytest.fixture(scope="module")
def text_gen(sd_folder, data):
    return StableDiffusionGenerator.from_pretrained(sd_folder, data.classes, channels=1, image_size=8, resolution=16,
                                                    modifiers=["on grass", "at night"])


def test_the_tiny_pipeline_is_laid_out_and_loads_like_a_checkpoint(sd_folder, text_gen):
    assert json.loads((sd_folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert (sd_folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(sd_folder.rglob("*.bin")) and not list(sd_folder.rglob("*.pt"))
    # one prompt embedding per class and modifier, all different
    pe = text_gen.prompt_embeds
    assert pe.shape[:2] == (3, 2) and not torch.allclose(pe[0, 0], pe[0, 1]) and not torch.allclose(pe[0, 0], pe[1, 0])
    assert text_gen.config.prompts(1) == ["a photo of a class1, on grass", "a photo of a class1, at night"]


@pytest.mark.parametrize("slicing", [False, True])
def test_training_on_a_gpu_gives_the_attention_back_as_it_was(sd_folder, data, slicing):
    """On a GPU the UNet trains with plain SDPA attention; afterwards it has the processors it
    had, so a generator trained in this process samples as the same generator read back."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    gen = StableDiffusionGenerator.from_pretrained(sd_folder, data.classes, channels=1, image_size=8, resolution=16)
    if slicing:
        gen.pipe.enable_attention_slicing()
    before = {name: type(p) for name, p in gen.pipe.unet.attn_processors.items()}
    gen.device = torch.device("cuda")  # only the context's switches: nothing moves to a GPU
    with gen._training() as unet:
        assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    assert {name: type(p) for name, p in gen.pipe.unet.attn_processors.items()} == before
    assert slicing == any(p is not AttnProcessor2_0 for p in before.values())


def test_text_to_image_is_per_seed(text_gen):
    out = text_gen.generate([0, 1, 2, 1, 0], [1, 2, 3, 4, 5], sampler=SAMPLING)
    assert out.shape == (5, 1, 8, 8) and out.dtype == torch.uint8
    # an image depends on its label and seed only, not on its batch
    assert torch.equal(text_gen.generate([2, 1], [3, 4], sampler=SAMPLING), out[2:4])
    assert not torch.equal(text_gen.generate([2], [99], sampler=SAMPLING)[0], out[2])


def test_img2img_rows_with_strengths(text_gen, data):
    rows = [{"id": f"v{i}", "label": int(data.labels[i]), "seed": i, "source": i, "strength": s}
            for i, s in enumerate([0.5, 1.0, 0.5, 0.25])]
    out = text_gen.generate_rows(rows, SAMPLING, sources=data)
    assert out.shape == (4, 1, 8, 8)
    assert torch.equal(text_gen.generate_rows(rows[2:3], SAMPLING, sources=data)[0], out[2])
    with pytest.raises(SynthaugError, match="strength"):
        text_gen.generate([0], [0], sampler=SAMPLING, init_images=data.images[:1], strength=1.5)


def test_the_policy_is_exposed(text_gen):
    """UtilGen's handles: the initial latent noise and the prompt embeddings."""
    base = text_gen.generate([0], [7], sampler=SAMPLING)
    shape = (1, *text_gen._latent_shape())
    assert shape == (1, 4, 8, 8)
    assert torch.equal(text_gen.generate([0], [7], sampler=SAMPLING, noise=torch.randn(shape, generator=torch.Generator().manual_seed(7))), base)
    assert not torch.equal(text_gen.generate([0], [7], sampler=SAMPLING, noise=torch.randn(shape)), base)
    with pytest.raises(SynthaugError, match="noise must be"):
        text_gen.generate([0], [7], sampler=SAMPLING, noise=torch.randn(1, 4, 4, 4))
    saved, before = text_gen.prompt_embeds.clone(), text_gen.fingerprint()
    try:
        text_gen.prompt_embeds[0] += 1.0
        assert text_gen.fingerprint() != before
        assert not torch.equal(text_gen.generate([0], [7], sampler=SAMPLING), base)
    finally:
        text_gen.prompt_embeds = saved


@pytest.mark.parametrize("mode", OPERATORS)
def test_unclip_every_conditioning_operator(unclip_folder, mode):
    ds = make_dataset((2, 2), channels=3, size=16)
    gen = StableDiffusionGenerator.from_pretrained(unclip_folder, ds.classes, channels=3, image_size=16)
    assert gen.unclip and gen.image_embed_dim == 32
    rows = [{"label": c, "seed": 10 * c + j, "sources": [2 * c, 2 * c + 1], "conditioning": mode}
            for c in range(2) for j in range(2)]
    out = gen.generate_rows(rows, SAMPLING, sources=ds)
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(gen.generate_rows(rows[3:], SAMPLING, sources=ds)[0], out[3])
    with pytest.raises(SynthaugError, match="unCLIP pipeline, which generates from images"):
        gen.generate([0], [0], sampler=SAMPLING)


def test_lora_adaptation_saves_loads_and_is_cached(sd_folder, data, tmp_path):
    section = load_config(None, [f"generator.pretrained={sd_folder}", "generator.adapt_steps=3", "generator.lora_rank=2",
                                 "generator.resolution=16", "generator.batch_size=4"]).generator
    gen, info = generator_for(data, section, cache_root=tmp_path)
    assert info["source"] == "adapted" and info["trained_now"] and gen.config.lora_rank == 2
    assert [h["step"] for h in gen.history] == [3] and gen.train_seconds > 0
    folder = tmp_path / info["path"].split("/")[-1]
    assert (folder / "policy.safetensors").exists() and not list(folder.rglob("*.bin"))
    again, info2 = generator_for(data, section, cache_root=tmp_path)
    assert info2["source"] == "cache" and again.fingerprint() == gen.fingerprint()
    assert torch.equal(again.generate([1], [3], sampler=SAMPLING), gen.generate([1], [3], sampler=SAMPLING))
    assert load_generator(folder).fingerprint() == gen.fingerprint()
    plain, _ = generator_for(data, load_config(None, [f"generator.pretrained={sd_folder}", "generator.resolution=16"]).generator,
                             cache_root=tmp_path)
    assert plain.fingerprint() != gen.fingerprint()  # the adapter is part of what names a generator


def test_utilgen_handles_prompt_embeddings_inversion_and_lora_dpo(sd_folder, data, tmp_path):
    gen = StableDiffusionGenerator.from_pretrained(sd_folder, data.classes, channels=1, image_size=8, resolution=16)
    images, labels = data.images[:4], data.labels[:4]  # classes 0 only
    before = gen.prompt_embeds.clone()
    out = gen.optimise_policy_embeddings(images, labels, steps=3, lr=1e-2, batch_size=4)
    assert len(out["relative_shift"]) == 1 and out["relative_shift"][0] > 0
    assert not torch.equal(gen.prompt_embeds[0], before[0]) and torch.equal(gen.prompt_embeds[1:], before[1:])
    # DDIM inversion returns initial latents the DDIM sampler starts from
    noise = gen.invert_noise(images, labels, steps=2)
    assert noise.shape == (4, *gen.noise_shape) and torch.isfinite(noise).all()
    ddim = SamplerConfig(sampler="ddim", steps=2, guidance_scale=1.0, batch_size=4)
    assert gen.generate(labels, [0, 1, 2, 3], sampler=ddim, noise=noise).shape == images.shape
    # Diffusion-DPO on a fresh LoRA adapter: the reference is the adapter switched off, so the first
    # loss is log 2 (model = reference); the adapter then saves and loads with the generator
    pairs = (data.images[:3], data.images[3:6], data.labels[:3])
    first = gen.finetune_dpo(*pairs, steps=1, batch_size=3, lr=1e-3)
    assert gen.config.lora_rank == 4 and abs(first[0]["loss"] - math.log(2)) < 1e-5
    # the adapter exists now: the reference is a frozen copy of the adapted UNet, so again log 2 at first
    assert abs(gen.finetune_dpo(*pairs, steps=1, batch_size=3, lr=1e-3)[0]["loss"] - math.log(2)) < 1e-5
    history = gen.finetune_dpo(*pairs, steps=10, batch_size=3, lr=1e-3)
    assert len(history) == 1 and history[0]["step"] == 10
    lora_b = [v for k, v in gen.pipe.unet.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: DPO moved it
    folder = tmp_path / "saved"
    gen.save_pretrained(folder)
    assert load_generator(folder).fingerprint() == gen.fingerprint()


def test_an_interrupted_adaptation_resumes(sd_folder, data, tmp_path, monkeypatch):
    from synthaug.utils import loop

    section = load_config(None, [f"generator.pretrained={sd_folder}", "generator.adapt_steps=4", "generator.resolution=16",
                                 "generator.checkpoint_every=2", "generator.batch_size=4"]).generator
    reference, _ = generator_for(data, section, cache_root=tmp_path / "ref")
    real_save = loop.save_state

    def save_then_die(folder, state):
        real_save(folder, state)
        if state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        generator_for(data, section, cache_root=tmp_path / "run")
    monkeypatch.setattr(loop, "save_state", real_save)
    resumed, info = generator_for(data, section, cache_root=tmp_path / "run")
    assert info["source"] == "adapted" and [h["step"] for h in resumed.history] == [4]
    assert resumed.fingerprint() == reference.fingerprint()


def test_errors_name_the_problem_and_the_fix(sd_folder, unclip_folder, data, tmp_path):
    from synthaug.generate.stable_diffusion import check_pretrained

    with pytest.raises(SynthaugError, match="not a diffusers pipeline folder"):
        StableDiffusionGenerator.from_pretrained(tmp_path, data.classes)
    (tmp_path / "saved").mkdir()  # a folder synthaug's save_pretrained wrote passes the run's early check
    (tmp_path / "saved" / "generator.json").write_text("{}")
    check_pretrained(str(tmp_path / "saved"))
    check_pretrained(str(sd_folder))
    with pytest.raises(SynthaugError, match="no model_index.json, no generator.json"):
        check_pretrained(str(tmp_path))
    with pytest.raises(SynthaugError, match="download it first"):
        StableDiffusionGenerator.from_pretrained("nobody/no-such-model", data.classes)
    with pytest.raises(SynthaugError, match="not an unCLIP pipeline"):
        generator_for(data, load_config(None, [f"generator.pretrained={sd_folder}"]).generator, cache_root=tmp_path,
                      image_embed_dim=8)
    with pytest.raises(SynthaugError, match="not both"):
        load_config(None, [f"generator.pretrained={sd_folder}", "generator.path=x"])
    with pytest.raises(SynthaugError, match="has no {name}"):
        load_config(None, [f"generator.pretrained={sd_folder}", "generator.prompt=a photo"])


SD_RUN = ["data.dataset=digits", "train.epochs=1", "train.batch_size=64", "train.augment=none", "generator.resolution=16",
          "generator.sampling_steps=2", "generator.sampling_batch_size=64", "generator.guidance_scale=2", "report.baselines=ce"]
RECIPES = {
    "synaug": ["recipe=synaug", "split.ratio=4", "split.n_max=8"],
    "tada": ["recipe=tada", "split.kind=few-shot", "split.k=4", "train.epochs=2", "tada.early_epochs=1", "tada.variants=1"],
    "augcond": ["recipe=augcond", "split.kind=few-shot", "split.k=2", "augcond.expand=2", "augcond.mode=embed-mixup"],
    "utilgen": ["recipe=utilgen", "split.kind=few-shot", "split.k=4", "utilgen.per_round=1", "split.val_per_class=2", "utilgen.rounds=2",
                "utilgen.valuation_epochs=1", "utilgen.embedding_steps=2", "utilgen.dpo_steps=2", "utilgen.sampling_steps=2",
                "utilgen.final_multiple=1", "utilgen.sampler=ddim"],
    "dpt": ["recipe=dpt", "split.kind=few-shot", "split.k=2", "dpt.per_class=2", "train.ssl_mu=1"],
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_runs_on_stable_diffusion(recipe, sd_folder, unclip_folder, tmp_path, monkeypatch):
    folder = unclip_folder if recipe in ("augcond", "dpt") else sd_folder  # image-conditioned
    sets = [*SD_RUN, *RECIPES[recipe], f"generator.pretrained={folder}", f"output_dir={tmp_path}", "name=run"]
    monkeypatch.setattr(sys, "argv", ["synthaug", "run", "--quiet", *[a for kv in sets for a in ("-s", kv)]])
    main()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    generator = metrics["generator"]
    assert generator["kind"] == "stable-diffusion" and generator["path"] == str(folder)
    rows = [json.loads(line) for line in (tmp_path / "run").rglob("metadata.jsonl").__next__().read_text().splitlines()]
    made_by = {r["generator"] for r in rows}
    if recipe == "utilgen":  # each round's generator differs (prompt embeddings, LoRA); the last made the final set
        assert len(made_by) == 3 and {r["generator"] for r in rows if "final" in r["id"]} == {generator["fingerprint"]}
    else:
        assert made_by == {generator["fingerprint"]}
    assert "balanced_accuracy" in json.dumps(metrics)
    if recipe == "synaug":
        assert "Stable Diffusion through diffusers" in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.slow
def test_a_real_checkpoint(tmp_path):
    """A real Stable Diffusion checkpoint, when one is on disk: SYNTHAUG_SD_CHECKPOINT=<folder>
    make test-slow. A few images of two classes at 256 px."""
    import os

    folder = os.environ.get("SYNTHAUG_SD_CHECKPOINT")
    if not folder:
        pytest.skip("set SYNTHAUG_SD_CHECKPOINT to a Stable Diffusion pipeline folder")
    gen = StableDiffusionGenerator.from_pretrained(folder, ["cat", "dog"], channels=3, image_size=32, resolution=256)
    out = gen.generate([0, 1], [0, 1], sampler=SamplerConfig(sampler="dpm-solver++", steps=10, guidance_scale=7.5))
    assert out.shape == (2, 3, 32, 32) and out.float().std() > 5

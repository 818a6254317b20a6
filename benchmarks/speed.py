"""Speed on the machine at hand, lever by lever, with the quality each lever keeps.

    python benchmarks/speed.py            # the demo's setting, about 40 minutes on 2 CPU cores; resumable
    python benchmarks/speed.py --quick    # digits and a tiny generator: checks the script in a minute

Four parts, all in one run so that their numbers share the machine's state:
1. **Peak**: the machine's own rate for a large matmul and for a convolution of the UNet's
   shapes, in float32 and bfloat16 (GFLOP/s), and the UNet's FLOPs per image per step.
2. **Sampling**: for the demo's trained generator (MNIST-5k-LT r50, `small`, 800 steps), each
   lever generates the same labels and seeds; a bare diffusers loop (the same UNet in float32,
   `DPMSolverMultistepScheduler`, classifier-free guidance, nothing else) is timed in the same
   repeat, and repeats interleave lever and loop. Quality: the share of images the oracle
   classifier (trained on the full balanced real data) recognises, and the Frechet distance to
   real test images in its features. `default` is what synthaug does out of the box here.
3. **Generator training**: steps/s in float32 and with the default (bfloat16 autocast where
   native, float32 master weights), and the quality each reached after the same steps.
4. **Classifier training**: images/s of the small CNN and ResNet-32 per lever.
5. **Augmentation policies**: RandAugment, TrivialAugmentWide and AutoAugment on a FixMatch
   strong view's batch (448 images), image by image through torchvision against
   `BatchedPolicy` (the same draws, each operation once on the images that drew it), on one
   CPU thread wherever the script runs (the training loop runs policies on the CPU), in
   interleaved repeats; each repeat checks the two give the same images.

Rows go to benchmarks/results/speed.jsonl (one per part, lever and repeat); the table to
benchmarks/results/speed.md and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from common import HERE, append_row, environment, publish, read_rows
from sampler import features, frechet_distance

from synthaug.classify import evaluate, fit_classifier
from synthaug.classify.train import POLICIES, BatchedPolicy
from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.data.dataset import ImageDataset
from synthaug.generate import diffusion
from synthaug.generate.cache import generator_for, resolved_precision, sampler_config
from synthaug.generate.network import build_train_scheduler
from synthaug.task import make_task
from synthaug.utils.runtime import resolve_device

SETTINGS = {
    "full": dict(config=["data.dataset=mnist-5k", "split.ratio=50", "train.epochs=30", "generator.steps=800",
                         "generator.sampling_steps=10"], images=256, repeats=3, matmul=2048, train_probe=20,
                 quality_images=1000),
    "quick": dict(config=["data.dataset=digits", "split.ratio=5", "train.epochs=5", "generator.preset=tiny",
                          "generator.steps=30", "generator.sampling_steps=4", "generator.sampling_batch_size=16"],
                  images=40, repeats=2, matmul=512, train_probe=3, quality_images=40),
}
# lever -> changes to the default sampling: SamplerConfig fields, and channels_last / compile / threads / solver
LEVERS = {
    "default": {},
    "float32": dict(precision="float32"),
    "channels_last, float32": dict(precision="float32", channels_last=True),
    "channels_last, bfloat16": dict(precision="bfloat16", channels_last=True),
    "compile, float32": dict(precision="float32", compile=True),
    "compile, bfloat16": dict(precision="bfloat16", compile=True),
    "batch 32": dict(batch_size=32),
    "batch 64": dict(batch_size=64),
    "batch 256": dict(batch_size=256),
    "1 thread": dict(threads=1),
    "8 steps": dict(steps=8),
    "6 steps": dict(steps=6),
    "UniPC, 8 steps": dict(steps=8, solver="unipc"),
}
BARE = "bare diffusers loop (float32)"
PARTS = ("sampling", "training", "classifier", "augmentation")  # and the peak rates, always (every table reads them)
# classifier levers: TrainConfig changes (the last two only where a GPU makes them differ from the default)
CLASSIFIER_LEVERS = {"float32": dict(precision="float32", channels_last=False),
                     "channels_last, float32": dict(precision="float32"), "bfloat16": dict(channels_last=False),
                     "default": {}, "data on the CPU": dict(data_on_device=False)}


def gflops(fn, flop: float, device: torch.device, repeats: int = 3) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return flop * repeats / (time.perf_counter() - t0) / 1e9


@torch.no_grad()
def peak_rates(n: int, device: torch.device) -> dict:
    """GFLOP/s of an n^3 matmul and of a 3x3 convolution at the UNet's middle shape."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x, conv = torch.randn(256, 64, 14, 14, device=device), torch.nn.Conv2d(64, 64, 3, padding=1).to(device)
    conv_flop = 2 * 256 * 64 * 64 * 9 * 14 * 14
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        name, a2, b2 = str(dtype).removeprefix("torch."), a.to(dtype), b.to(dtype)
        rates[f"matmul {name}"] = gflops(lambda a2=a2, b2=b2: a2 @ b2, 2 * n**3, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            rates[f"conv {name}"] = gflops(lambda: conv(x), conv_flop, device)
    return rates


def unet_flops(generator) -> float:
    """FLOPs of one UNet forward for one image (PyTorch's FLOP counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    c, s = generator.config.channels, generator.config.image_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        generator.unet(torch.randn(1, c, s, s), torch.tensor([500]), class_labels=torch.tensor([0]))
    return float(counter.get_total_flops())


@torch.no_grad()
def bare_loop(generator, labels: torch.Tensor, seed: int, sampling) -> torch.Tensor:
    """What a user writes with diffusers alone: the same UNet, scheduler and guidance, float32."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(
        build_train_scheduler(generator.config).config, algorithm_type="sde-dpmsolver++", timestep_spacing="trailing",
        thresholding=True, sample_max_value=1.0)
    g, device = torch.Generator().manual_seed(seed), next(generator.unet.parameters()).device
    c, s, out = generator.config.channels, generator.config.image_size, []
    for i in range(0, len(labels), sampling.batch_size):
        y = labels[i: i + sampling.batch_size].to(device)
        cond = torch.cat([y, torch.full_like(y, generator.null_class)])
        x = torch.randn(len(y), c, s, s, generator=g).to(device)
        scheduler.set_timesteps(sampling.steps)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = generator.unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, class_labels=cond).sample
            eps_cond, eps_uncond = eps.chunk(2)
            x = scheduler.step(eps_uncond + sampling.guidance_scale * (eps_cond - eps_uncond), t, x, generator=g).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


@contextlib.contextmanager
def lever_applied(generator, lever: dict, compiled: dict):
    """The generator as the lever wants it (memory layout, compiled UNet, threads, solver),
    restored afterwards."""
    unet, threads, build = generator.unet, torch.get_num_threads(), diffusion.build_sampler
    if lever.get("channels_last"):
        generator.unet = unet.to(memory_format=torch.channels_last)
    if lever.get("compile"):  # on a GPU with CUDA graphs ("reduce-overhead"): the steps are small kernels
        if "unet" not in compiled:
            on_gpu = next(unet.parameters()).device.type == "cuda"
            compiled["unet"] = torch.compile(unet, dynamic=False, mode="reduce-overhead" if on_gpu else None)
        generator.unet = compiled["unet"]
    if lever.get("threads"):
        torch.set_num_threads(lever["threads"])
    if lever.get("solver") == "unipc":
        from diffusers import UniPCMultistepScheduler

        class UniPC(UniPCMultistepScheduler):  # a deterministic solver: it draws no noise
            def step(self, *args, generator=None, **kwargs):
                return super().step(*args, **kwargs)

        diffusion.build_sampler = lambda config, sampler: UniPC.from_config(
            build_train_scheduler(config).config, timestep_spacing="trailing", thresholding=True, sample_max_value=1.0)
    try:
        yield
    finally:
        generator.unet = unet.to(memory_format=torch.contiguous_format)
        torch.set_num_threads(threads)
        diffusion.build_sampler = build


def quality(oracle, reference, images, labels, classes) -> dict:
    recognised = evaluate(oracle, ImageDataset(images, labels, classes=classes))["accuracy"]
    return {"oracle_recognised": recognised, "frechet_distance": frechet_distance(features(oracle, images), reference)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits and a tiny generator: checks the script")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS),
                        help="which parts to run (a GPU lease: classifier alone)")
    parser.add_argument("--dataset", help="the classifier part's data instead of the setting's (e.g. cifar10)")
    parser.add_argument("--models", nargs="+", default=["small-cnn", "resnet32"], help="the classifier part's models")
    parser.add_argument("--classifier-levers", nargs="+", default=list(CLASSIFIER_LEVERS), choices=list(CLASSIFIER_LEVERS))
    args = parser.parse_args()
    setting = SETTINGS["quick" if args.quick else "full"]
    if args.dataset:
        setting = {**setting, "config": [*setting["config"], f"data.dataset={args.dataset}"]}
        if set(args.parts) != {"classifier"}:
            parser.error("--dataset is for the classifier part: add --parts classifier")
    results = HERE / "results" / f"speed{'-quick' if args.quick else ''}.jsonl"
    cache = HERE / "results" / "cache" / "generators"
    env = environment()  # rows of each device are kept apart: a GPU run adds its own

    def rows_here() -> list[dict]:
        return [r for r in read_rows(results) if r["device"] == env["device"]]

    done = {(r["part"], r["lever"], r.get("model"), r.get("repeat")) for r in rows_here()}

    def record(row: dict):
        append_row(results, {**row, **env})
        done.add((row["part"], row["lever"], row.get("model"), row.get("repeat")))
        print({k: v for k, v in row.items() if k not in ("per_class",)}, flush=True)

    config = load_config(None, [*setting["config"], f"generator.cache_dir={cache}"])
    task = make_task(load_dataset(config.data.dataset), config.split)

    # 1. peak rates (always)
    device = resolve_device("auto")
    if ("peak", "machine", None, None) not in done:
        record({"part": "peak", "lever": "machine", "gflops": peak_rates(setting["matmul"], device)})
    if "classifier" in args.parts:  # 4. first: a GPU lease runs it alone
        levers = {k: CLASSIFIER_LEVERS[k] for k in args.classifier_levers}
        classifier_part(task, config, device, done, record, args.models, levers, name=args.dataset or config.data.dataset)
    if "augmentation" in args.parts:  # 5. cheap, and needs no generator
        augmentation_part(done, record, repeats=setting["repeats"])
    if set(args.parts) <= {"classifier", "augmentation"}:
        publish(results, "speed", summarise(read_rows(results)), to_benchmarks=not args.quick)
        return

    # the demo's generator, trained in the default precision (cached); the sampling part uses it
    generator, _ = generator_for(task.train, config.generator, cache_root=cache, progress=True)
    oracle = fit_classifier(task.oracle, replace(config.train, precision="float32", channels_last=False), seed=0).model
    reference = features(oracle, task.test.images)
    flops = unet_flops(generator)
    base = sampler_config(config.generator)
    n, classes = setting["images"], task.train.classes
    labels = torch.arange(len(classes)).repeat(n // len(classes) + 1)[:n]

    if "sampling" in args.parts:
        # 2. sampling: per repeat, the bare loop first, then every lever on the same labels and seeds
        compiled = {}
        for repeat in range(setting["repeats"]):
            seeds = list(range(repeat * n, (repeat + 1) * n))
            bare_seconds = next((r["seconds"] for r in rows_here()
                                 if r["part"] == "sampling" and r["lever"] == BARE and r["repeat"] == repeat), None)
            if bare_seconds is None:
                t0 = time.perf_counter()
                images = bare_loop(generator, labels, seed=repeat, sampling=replace(base, precision="float32"))
                bare_seconds = time.perf_counter() - t0
                record({"part": "sampling", "lever": BARE, "repeat": repeat, "images": n, "seconds": bare_seconds,
                        "images_per_s": n / bare_seconds, "bare_images_per_s": n / bare_seconds, "steps": base.steps,
                        "precision": "float32", "flops_per_image": 2 * flops * base.steps,
                        **quality(oracle, reference, images, labels, classes)})
            for name in args.levers:
                if ("sampling", name, None, repeat) in done:
                    continue
                lever = LEVERS[name]
                sampling = replace(base, **{k: v for k, v in lever.items() if k in ("precision", "batch_size", "steps")})
                with lever_applied(generator, lever, compiled):
                    warm = time.perf_counter()  # a compiled UNet compiles once per batch shape
                    for size in {sampling.batch_size, n % sampling.batch_size} - {0} if lever.get("compile") else {2}:
                        generator.generate(labels[:size], seeds[:size], sampler=sampling)
                    warm = time.perf_counter() - warm
                    t0 = time.perf_counter()
                    images = generator.generate(labels, seeds, sampler=sampling)
                    seconds = time.perf_counter() - t0
                record({"part": "sampling", "lever": name, "repeat": repeat, "images": n, "seconds": seconds,
                        "images_per_s": n / seconds, "bare_images_per_s": n / bare_seconds, "warmup_seconds": warm,
                        "steps": sampling.steps, "precision": sampling.precision, "flops_per_image": 2 * flops * sampling.steps,
                        **quality(oracle, reference, images, labels, classes)})

    if "training" in args.parts:
        # 3b. generator training: float32 against the default, same steps, each judged on a larger
        # sample (seeds no sampling repeat used); then throughput probes
        m = setting["quality_images"]
        labels, seeds = torch.arange(len(classes)).repeat(m // len(classes) + 1)[:m], list(range(10_000, 10_000 + m))
        for lever, precision in (("default", "auto"), ("float32", "float32")):
            if ("training", lever, None, None) in done:
                continue
            section = replace(config.generator, precision=precision)
            gen, _ = generator_for(task.train, section, cache_root=cache, progress=True)  # trained once, then cached
            images = gen.generate(labels, seeds, sampler=base)
            record({"part": "training", "lever": lever, "precision": resolved_precision(precision, "auto"),
                    "steps": section.steps, "train_seconds": gen.train_seconds, "steps_per_s": section.steps / gen.train_seconds,
                    "final_loss": gen.history[-1]["loss"], "images": m, **quality(oracle, reference, images, labels, classes)})
        for lever, change in (("channels_last, bfloat16", dict(channels_last=True)), ("batch 128", dict(batch_size=128))):
            if ("training", lever, None, None) not in done:
                record({"part": "training", "lever": lever, **train_probe(task.train, config, setting["train_probe"], **change)})

    publish(results, "speed", summarise(read_rows(results)), to_benchmarks=not args.quick)


def classifier_part(task, config, device, done: set, record, models: list[str], levers: dict, name: str):
    """Images/s of the small CNN and ResNet-32 per lever (second epoch of two on the oracle's
    data), and on a GPU the data kept on the CPU against on the device: the same training
    (the same augmentation draws), so the two histories must agree."""
    if device.type != "cuda":  # the data's place is a GPU's lever
        levers = {k: v for k, v in levers.items() if "data_on_device" not in v}
    for model in models:
        histories = {}
        for lever, change in levers.items():
            key = f"{lever}, {name}" if name != "mnist-5k" else lever
            if ("classifier", key, model, None) in done:
                continue
            cfg = replace(config.train, model=model, epochs=2, **change)
            history = fit_classifier(task.oracle, cfg, seed=0).history
            histories[lever] = history
            steps = math.ceil(len(task.oracle) / cfg.batch_size)
            record({"part": "classifier", "lever": key, "model": model, "images": len(task.oracle),
                    "epoch_seconds": history[-1]["seconds"], "images_per_s": len(task.oracle) / history[-1]["seconds"],
                    "steps_per_s": steps / history[-1]["seconds"], "train_acc": history[-1]["train_acc"],
                    "loss": history[-1]["loss"]})
        if "data on the CPU" in histories and "default" in histories:
            a, b = histories["data on the CPU"][-1], histories["default"][-1]
            print(f"{model}: data on the CPU against on the device, epoch 2 loss {a['loss']:.5f} / {b['loss']:.5f}, "
                  f"train accuracy {a['train_acc']:.4f} / {b['train_acc']:.4f}", flush=True)


def augmentation_part(done: set, record, repeats: int, batch: int = 448):
    """Seconds per batch of each policy image by image (torchvision) and batched, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for repeat in range(repeats):
            for shape in ((1, 28, 28), (3, 32, 32)):
                x = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(repeat))
                size = "x".join(map(str, shape))
                for policy, policy_class in POLICIES.items():
                    if all(("augmentation", f"{policy}, {way}", size, repeat) in done for way in ("per image", "batched")):
                        continue
                    torch.manual_seed(repeat)
                    transform, t0 = policy_class(), time.perf_counter()
                    expected = torch.stack([transform(image) for image in x])
                    per_image = time.perf_counter() - t0
                    batched = BatchedPolicy(policy_class)
                    torch.manual_seed(repeat)
                    t0 = time.perf_counter()
                    same = torch.equal(batched(x), expected)
                    seconds = time.perf_counter() - t0
                    for way, sec in (("per image", per_image), ("batched", seconds)):
                        record({"part": "augmentation", "lever": f"{policy}, {way}", "model": size, "repeat": repeat,
                                "images": batch, "seconds": sec, "images_per_s": batch / sec, "same_images": same,
                                "threads_used": 1})
    finally:
        torch.set_num_threads(threads)


def train_probe(data, config, steps: int, channels_last: bool = False, batch_size: int | None = None) -> dict:
    """Steps/s of a few training steps of a fresh generator (throughput only)."""
    from synthaug.generate.cache import network_config, train_config
    from synthaug.generate.diffusion import DiffusionGenerator
    from synthaug.generate.training import train_generator

    gen = DiffusionGenerator(network_config(config.generator, data))
    if channels_last:
        gen.unet = gen.unet.to(memory_format=torch.channels_last)
    cfg = replace(train_config(config.generator), steps=steps, batch_size=batch_size or config.generator.batch_size)
    train_generator(gen, data, replace(cfg, steps=2))  # warm-up
    train_generator(gen, data, cfg)
    return {"steps": steps, "batch_size": cfg.batch_size, "steps_per_s": steps / gen.train_seconds,
            "images_per_s": steps * cfg.batch_size / gen.train_seconds}


def mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else float("nan")


def summarise(rows: list[dict]) -> str:
    """One section per device the rows ran on."""
    return "\n".join(device_table([r for r in rows if r["device"] == d]) for d in dict.fromkeys(r["device"] for r in rows))


def device_table(rows: list[dict]) -> str:
    env = rows[0]
    peak = next(r["gflops"] for r in rows if r["part"] == "peak")
    lines = [f"**{env['device']}**: {env['machine']}, {env['threads']} threads, torch {env['torch'].split('+')[0]}. "
             f"Measured peak: matmul {peak['matmul float32']:.0f} GFLOP/s in float32, {peak['matmul bfloat16']:.0f} in "
             f"bfloat16; a 3x3 conv of the UNet's shape {peak['conv float32']:.0f} / {peak['conv bfloat16']:.0f}.", ""]
    sampling = [r for r in rows if r["part"] == "sampling"]
    if sampling:
        first = sampling[0]
        lines += [f"**Sampling** ({first['images']} images per repeat, {len({r['repeat'] for r in sampling})} interleaved "
                  "repeats, mean over repeats; ratio: images/s over the bare loop timed in the same repeat; % of peak: "
                  "achieved FLOP rate over the matmul peak of the lever's precision)", "",
                  "| lever | steps | precision | images/s | x bare loop (min-max) | oracle recognises | Frechet distance "
                  "| % of peak |",
                  "|---|---|---|---|---|---|---|---|"]
        for lever in dict.fromkeys(r["lever"] for r in sampling):
            rs = [r for r in sampling if r["lever"] == lever]
            ratios = [r["images_per_s"] / r["bare_images_per_s"] for r in rs]
            rate = statistics.fmean(r["images_per_s"] * r["flops_per_image"] for r in rs) / 1e9
            pct = 100 * rate / peak[f"matmul {rs[0]['precision']}"]
            lines.append(f"| {lever} | {rs[0]['steps']} | {rs[0]['precision']} | {mean(rs, 'images_per_s'):.1f} | "
                         f"{statistics.fmean(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
                         f"{100 * mean(rs, 'oracle_recognised'):.1f}% | {mean(rs, 'frechet_distance'):.2f} | "
                         f"{pct:.0f}% |")
        lines.append("")
    training = [r for r in rows if r["part"] == "training"]
    if training:
        judged = next((r["images"] for r in training if "train_seconds" in r and "images" in r), "256")
        lines += [f"**Generator training** (each trained generator judged on {judged} images of the default sampler)", "",
                  "| lever | steps/s | images/s | final loss | minutes | oracle recognises "
                  "| Frechet distance |", "|---|---|---|---|---|---|---|"]
        for r in sorted(training, key=lambda r: "train_seconds" not in r):  # whole trainings first
            batch = r.get("batch_size", 64)
            full = "train_seconds" in r
            lines.append(f"| {r['lever']} | {r['steps_per_s']:.2f} | {r['steps_per_s'] * batch:.0f} | "
                         f"{r['final_loss']:.4f} | {r['train_seconds'] / 60:.1f} | {100 * r['oracle_recognised']:.1f}% | "
                         f"{r['frechet_distance']:.2f} |" if full else
                         f"| {r['lever']} (batch {batch}, {r['steps']} steps) | {r['steps_per_s']:.2f} | "
                         f"{r['images_per_s']:.0f} | - | - | - | - |")
        lines.append("")
    classifier = [r for r in rows if r["part"] == "classifier"]
    if classifier:
        models = list(dict.fromkeys(r["model"] for r in classifier))
        lines += ["**Classifier training** (images/s, second epoch)", "", "| lever | " + " | ".join(models) + " |",
                  "|---|" + "---|" * len(models)]
        for lever in dict.fromkeys(r["lever"] for r in classifier):
            cells = [next((f"{r['images_per_s']:.0f}" for r in classifier if r["lever"] == lever and r["model"] == m), "-")
                     for m in models]
            lines.append(f"| {lever} | " + " | ".join(cells) + " |")
    augmentation = [r for r in rows if r["part"] == "augmentation"]
    if augmentation:
        sizes = list(dict.fromkeys(r["model"] for r in augmentation))
        lines += ["", f"**Augmentation policies** (ms per batch of {augmentation[0]['images']} uint8 images, one thread, "
                  f"mean over {len({r['repeat'] for r in augmentation})} repeats; batched gives the same images: "
                  f"{all(r['same_images'] for r in augmentation)})", "",
                  "| policy | " + " | ".join(f"{s} per image | {s} batched | x" for s in sizes) + " |",
                  "|---|" + "---|---|---|" * len(sizes)]
        for policy in dict.fromkeys(r["lever"].rsplit(", ", 1)[0] for r in augmentation):
            cells = []
            for size in sizes:
                ms = {way: 1000 * mean([r for r in augmentation if r["model"] == size
                                        and r["lever"] == f"{policy}, {way}"], "seconds") for way in ("per image", "batched")}
                cells.append(f"{ms['per image']:.0f} | {ms['batched']:.0f} | {ms['per image'] / ms['batched']:.1f}")
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

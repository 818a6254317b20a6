"""UtilGen (seed 000): steer generation by the downstream task's own feedback.

Each of `rounds` rounds:
1. Generate a class-balanced batch with the current generator and generation policy.
2. Value it: train the classifier on real + synthetic images with per-sample weights from a
   meta-learned weight network (Meta-Weight-Net, on the clean real validation split); a
   sample's weight is its utility, written into the store's metadata.
3. Optimise the model: Diffusion-DPO, high- over low-utility images of the same class.
4. Optimise the policy (instance level) on each class's high-utility images: the class's
   embedding vector (textual inversion, kept near the base generator's) and the initial
   noise (DDIM inversion of those images under the round's final generator; the next round
   starts from noise around them). Only DDIM follows an inverted noise back to its image,
   so with any other sampler the next round starts from the images themselves, re-noised
   to `renoise_strength` (SDEdit).
Then generate the final set (`final_multiple` x the real set) and train the classifier on
it, alone (the paper's synthetic-only setting) and with the real images.

Each finished round leaves its generator and noise bank (inverted noises, or the images to
re-noise) in the run folder, so an
interrupted run resumes at the round it was in (generation and valuation inside a round
resume from the store and the classifier checkpoint).
"""

from __future__ import annotations

import html
import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..choices import Sampler
from ..classify import evaluate, extract_features, fit_classifier, training_key
from ..config import register_section
from ..data import ImageDataset, concat
from ..errors import SynthaugError
from ..generate.cache import check_generator, check_store_made, load_generator, sampler_config
from ..generate.network import SamplerConfig
from ..generate.policy import mix_noise
from ..generate.stage import generator_stage
from ..plan import row_kind, utility_plan
from ..report import image_row, pct, png, subplots
from ..select.metrics import diversity_ratio, memorization_ratio
from ..store import SyntheticStore
from ..utils.io import atomic_save_tensors, atomic_write_json, read_keyed
from ..utils.paths import check_folder
from ..value import MetaWeightConfig, fit_meta_weighted, utilities
from .registry import RecipeResult, register_recipe, train_and_evaluate


@register_section("utilgen")
@dataclass
class UtilgenSection:
    """UtilGen: rounds of generate -> value (meta-learned weights) -> optimise model -> optimise policy."""

    rounds: int = 2
    per_round: float = 1.0  # images generated per round, x the real training set (class-balanced)
    final_multiple: float = 5.0  # the final synthetic set, x the real training set (class-balanced)
    top_share: float = 0.25  # per class, the share of a round's images taken as high (and as low) utility
    valuation_epochs: int = 10  # epochs of the meta-weighted classifier that values each round
    meta_lr: float = 1.0e-2  # Adam on the weight network (Meta-Weight-Net: 1e-3 over far more steps)
    embedding: bool = True  # instance level: optimise the class-embedding vectors on high-utility images
    embedding_steps: int = 200
    embedding_lr: float = 5.0e-3
    embedding_proximity: float = 1.0  # weight of the penalty keeping the vectors near the original ones
    # instance level: start generations from noise around DDIM inversions of high-utility images (sampler
    # ddim), or with any other sampler, which would not follow an inversion back to its image, from those
    # images themselves re-noised to renoise_strength (SDEdit: the share of the sampling steps re-run)
    noise: bool = True
    noise_mix: float = 0.8  # ddim: x_T = mix * inverted + sqrt(1 - mix^2) * fresh noise
    renoise_strength: float = 0.8  # any other sampler
    inversion_guidance: float = 1.0  # guidance of the inversion (the generation keeps generator.guidance_scale)
    model_level: bool = True  # fine-tune the generator with Diffusion-DPO, high- over low-utility images
    dpo_steps: int = 200
    dpo_lr: float = 1.0e-5
    dpo_beta: float = 2000.0
    # rounds and the final set sample with this; ddim is deterministic, so an image's inverted noise leads
    # back to it (exactly when inversion_guidance equals generator.guidance_scale, near it otherwise; the
    # inversion guides the steps generator.guidance_interval does)
    sampler: Sampler = "ddim"
    sampling_steps: int = 25
    store_dir: str | None = None  # where generated images go (default: <run folder>/synthetic)

    def __post_init__(self):
        if self.rounds < 0 or self.per_round <= 0 or self.final_multiple <= 0 or not 0 < self.top_share <= 0.5:
            raise SynthaugError("utilgen.rounds must be >= 0, per_round and final_multiple > 0, top_share in (0, 0.5]")
        if not 0 <= self.noise_mix <= 1 or self.dpo_beta <= 0 or self.valuation_epochs < 1:
            raise SynthaugError("utilgen.noise_mix must be in [0, 1], dpo_beta > 0 and valuation_epochs >= 1")
        if not 0 < self.renoise_strength <= 1:
            raise SynthaugError(f"utilgen.renoise_strength must be in (0, 1], got {self.renoise_strength}")
        if min(self.meta_lr, self.embedding_lr, self.dpo_lr) <= 0 or self.embedding_proximity < 0:
            raise SynthaugError("utilgen.meta_lr, embedding_lr and dpo_lr must be > 0, embedding_proximity >= 0")
        if self.inversion_guidance < 0 or min(self.embedding_steps, self.dpo_steps, self.sampling_steps) < 1:
            raise SynthaugError("utilgen.inversion_guidance must be >= 0, embedding_steps, dpo_steps and "
                                "sampling_steps >= 1")
        check_folder(self.store_dir, "utilgen.store_dir")


def check(task, config):
    if task.val is None or len(task.val) == 0:
        raise SynthaugError("utilgen values images on a clean real validation split: set split.val_per_class (e.g. 10)")
    # its rounds generate from noise and images in memory, in this process (selection: `runs.preflight`)
    if config.executor.name != "local":
        raise SynthaugError("utilgen generates in this process: leave executor.name=local")
    check_generator(config.generator, task.train)
    if config.utilgen.store_dir:
        check_store_made(config.utilgen.store_dir, task.train.classes, store_rows(task, config), config.generator,
                         config.train.device, sampling=sampling_of(config))


def per_class(task, multiple: float) -> int:
    return max(1, round(multiple * len(task.train) / task.train.num_classes))


def sampling_of(config) -> SamplerConfig:
    """UtilGen's sampling: the generator section's, with its own sampler and steps (DDIM inverts)."""
    return replace(sampler_config(config.generator, config.train.device), sampler=config.utilgen.sampler,
                   steps=config.utilgen.sampling_steps)


def store_rows(task, config) -> list[dict]:
    """Every row the run may write, with what is known of it before anything trains: the first
    round's (without rounds, the final set's) whole; the later rounds' and the final set's id, class
    and seed (which image each starts from depends on the rounds before it)."""
    opts, seed = config.utilgen, config.generator.plan_seed
    rows = []
    for i, name in enumerate([*(f"r{r}" for r in range(1, opts.rounds + 1)), "final"]):
        multiple = opts.final_multiple if name == "final" else opts.per_round
        plan = utility_plan(task.train, per_class=per_class(task, multiple), round_name=name, seed=seed)
        rows += plan if i == 0 else [{k: r[k] for k in ("id", "label", "group", "seed", "recipe")} for r in plan]
    return rows


# ---------------------------------------------------------------------------- report


def report(result: RecipeResult, real: ImageDataset) -> str:
    """UtilGen's section of report.html: utility of real vs synthetic images, what the policy and
    DPO steps did, the feature map before / after, and the highest- and lowest-utility images."""
    u = result.extra["utilgen"]
    out = [f"<h2>UtilGen rounds</h2><p>Synthetic + real: balanced accuracy <b>{pct(result.metrics['balanced_accuracy'])}%</b>; "
           f"synthetic only ({u['final_images']} images): <b>{pct(u['synthetic_only']['balanced_accuracy'])}%</b>. "
           f"Settings: {html.escape(json.dumps(u['settings']))}.</p>"]
    rounds = u["rounds"]
    if rounds:
        head = ("<table><tr><th>round</th><th>images</th><th>mean utility real</th><th>mean utility synthetic</th>"
                "<th>embedding loss (first → last)</th><th>DPO loss (last)</th><th>pairs ranked right</th></tr>")
        body = []
        for r in rounds:
            e, d = r.get("embedding"), (r.get("dpo") or [{}])[-1]
            emb = "-" if not e else f"{e['loss_first']:.4f} → {e['loss_last']:.4f}"
            dpo = "-" if "loss" not in d else f"{d['loss']:.4f}"
            ranked = "-" if "ranked_right" not in d else f"{100 * d['ranked_right']:.0f}%"
            body.append(f"<tr><td>{r['round']}</td><td>{r['images']}</td><td>{r['mean_utility_real']:.3f}</td>"
                        f"<td>{r['mean_utility_synthetic']:.3f}</td><td>{emb}</td><td>{dpo}</td><td>{ranked}</td></tr>")
        out.append(head + "".join(body) + "</table>")
        fig, axes = subplots(1, len(rounds), figsize=(3.6 * len(rounds), 2.6), squeeze=False)
        for ax, r in zip(axes[0], rounds):
            edges = [i / 20 for i in range(20)]
            total_r, total_s = max(1, sum(r["utility_real"])), max(1, sum(r["utility_synthetic"]))
            ax.bar(edges, [v / total_r for v in r["utility_real"]], 0.05, align="edge", alpha=0.6, label="real", color="#4c72b0")
            ax.bar(edges, [v / total_s for v in r["utility_synthetic"]], 0.05, align="edge", alpha=0.6, label="synthetic",
                   color="#dd8452")
            ax.set_title(f"round {r['round']}", fontsize=9)
            ax.set_xlabel("utility (learned weight)")
        axes[0][0].set_ylabel("share of images")
        axes[0][0].legend(fontsize=8)
        out.append("<p class='muted'>Utility of real and synthetic images per round.</p>" + png(fig))
    features = u.get("features")
    if features:
        fig, ax = subplots(figsize=(5.5, 4.5))
        styles = {"real": ("#555555", "o", "real"), "before": ("#4c72b0", "x", "synthetic, round 1"),
                  "after": ("#dd8452", "+", "synthetic, final")}
        for name, (color, marker, label) in styles.items():
            if name in features:
                xy = features[name]["xy"]
                ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=10, c=color, marker=marker, label=label, alpha=0.7)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8)
        out.append("<p class='muted'>t-SNE of the final classifier's features.</p>" + png(fig))
    for kind in ("highest", "lowest"):
        if len(result.figures.get(kind, ())):
            out.append(f"<p class='muted'>{kind.capitalize()}-utility images of round {rounds[-1]['round']}, "
                       "up to 4 per class (class by class):</p>" + image_row(result.figures[kind], 16))
    return "".join(out)


def _synthetic_only(final: ImageDataset, task, config, *, workdir: Path, progress: bool) -> tuple[dict, float]:
    """Test metrics of a classifier trained on the final set alone, for as many optimisation steps
    as the one on synthetic + real took, and the seconds it took. Kept in `synthetic-only.json` with
    what names them (the training's key, the test set, the shot thresholds); a re-run of the run folder
    reads them back when that matches."""
    real, size, t0 = task.train, config.train.batch_size, time.perf_counter()
    epochs = math.ceil(config.train.epochs * math.ceil((len(real) + len(final)) / size) / math.ceil(len(final) / size))
    train = replace(config.train, epochs=epochs, ssl="none")
    key = {**training_key(final, train, seed=config.seed), "test": task.test.fingerprint(),
           "counts": real.class_counts().tolist(), "thresholds": [config.eval.many_threshold, config.eval.few_threshold]}
    saved = workdir / "synthetic-only.json"
    if (before := read_keyed(saved, key)) is not None:
        return before["test"], before["seconds"]
    alone = fit_classifier(final, train, seed=config.seed, checkpoint_dir=workdir / "checkpoint-synthetic-only",
                           progress=progress)
    test = evaluate(alone.model, task.test, train_counts=real.class_counts(),
                    many_threshold=config.eval.many_threshold, few_threshold=config.eval.few_threshold)
    seconds = time.perf_counter() - t0
    atomic_write_json(saved, {"key": key, "test": test, "seconds": seconds})
    return test, seconds


def _generate(store, plan, generator, sampling, noise_bank, progress):
    from ..generate.cache import provenance

    shape = generator.noise_shape

    def from_noise(rows):
        noise = None
        if any(r.get("noise_from") is not None for r in rows):  # else the noise drawn from each seed
            noise = torch.stack([
                mix_noise(noise_bank[r["noise_from"]][None], [r["seed"]], r["noise_mix"])[0] if r.get("noise_from")
                else torch.randn(shape, generator=torch.Generator().manual_seed(r["seed"])) for r in rows])
        return generator.generate([r["label"] for r in rows], [r["seed"] for r in rows], sampler=sampling, noise=noise)

    def renoised(rows):  # any sampler but ddim: high-utility images re-noised (SDEdit)
        return generator.generate([r["label"] for r in rows], [r["seed"] for r in rows], sampler=sampling,
                                  strength=[r["strength"] for r in rows],
                                  init_images=torch.stack([noise_bank[r["noise_from"]] for r in rows]))

    def make(rows):  # an image depends on its row alone, so a batch can be split by kind
        out = None
        for fn, guided in ((renoised, True), (from_noise, False)):
            idx = [i for i, r in enumerate(rows) if (row_kind(r) == "renoised") == guided]
            if idx:
                images = fn([rows[i] for i in idx])
                out = images.new_empty(len(rows), *images.shape[1:]) if out is None else out
                out[idx] = images
        return out

    store.fill(plan, make, batch_size=sampling.batch_size, progress=progress, provenance=provenance(generator, sampling))
    store.verify()
    return store.load(ids=[r["id"] for r in plan])


def _extremes(labels: torch.Tensor, utility: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the indices of the `share` highest- and lowest-utility images, paired by
    rank (the i-th best with the i-th worst), so both lists have the same length."""
    top, bottom = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        order = idx[utility[idx].argsort(descending=True)]
        k = max(1, int(share * len(order)))
        if len(order) < 2:
            continue
        k = min(k, len(order) // 2)
        top.append(order[:k])
        bottom.append(order.flip(0)[:k])
    if not top:
        raise SynthaugError("too few images per class to tell high from low utility: raise utilgen.per_round")
    return torch.cat(top), torch.cat(bottom)


def _hist(values: torch.Tensor, bins: int = 20) -> list[int]:
    return torch.histc(values.float(), bins=bins, min=0.0, max=1.0).long().tolist()


def _save_noise(folder: Path, bank: dict[str, torch.Tensor], noise_from: dict[int, list[str]]):
    atomic_save_tensors(folder / "noise.safetensors", {k: v.contiguous() for k, v in bank.items()} or {"_empty": torch.zeros(1)},
                        {"noise_from": json.dumps(noise_from)})


def _load_noise(folder: Path) -> tuple[dict[str, torch.Tensor], dict[int, list[str]]]:
    from safetensors import safe_open

    with safe_open(str(folder / "noise.safetensors"), framework="pt") as f:
        bank = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
        noise_from = {int(c): ids for c, ids in json.loads(f.metadata()["noise_from"]).items()}
    return bank, noise_from


def _feature_map(model, real, store, rounds, final, n: int = 300, seed: int = 0) -> dict:
    """2-D t-SNE of the final classifier's features: real images, the first round's synthetic
    images (before optimisation) and the final ones (after)."""
    from sklearn.manifold import TSNE

    g = torch.Generator().manual_seed(seed)
    pick = lambda ds: ds.subset(torch.randperm(len(ds), generator=g)[:n])  # noqa: E731
    parts = {"real": pick(real), "after": pick(final)}
    if rounds:
        first = [r["id"] for r in store.rows() if r["id"].startswith("utilgen-r1-")]
        if first:
            parts["before"] = pick(store.load(ids=first))
    feats = torch.cat([extract_features(model, ds.images) for ds in parts.values()]).numpy()
    coords = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, max(2, len(feats) // 4))).fit_transform(feats)
    out, i = {}, 0
    for name, ds in parts.items():
        out[name] = {"xy": [[round(float(a), 3), round(float(b), 3)] for a, b in coords[i : i + len(ds)]],
                     "labels": ds.labels.tolist()}
        i += len(ds)
    return out


@register_recipe("utilgen", "UtilGen: rounds of generate, value (meta-learned weights), optimise model and policy; "
                 "then train on the final synthetic set, alone and with real data", check=check, report=report,
                 generates=True, ssl=True)
def utilgen(task, config, *, workdir=None, progress=False, trained=None) -> RecipeResult:
    check(task, config)
    opts, seconds = config.utilgen, {}
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="synthaug-"))
    real = task.train
    generator, generator_info = generator_stage(real, config, progress=progress, unlabeled=task.unlabeled)
    seconds["generator"] = generator_info.pop("seconds")
    sampling = sampling_of(config)
    store = SyntheticStore(Path(opts.store_dir) if opts.store_dir else workdir / "synthetic", real.classes)
    for key in ("generate", "value", "policy", "model"):
        seconds[key] = 0.0
    anchor = generator.policy_embeddings().detach().clone()  # the base generator's class (prompt) vectors

    # id of a high-utility image -> its inverted initial noise (ddim), or the image itself to re-noise
    noise_bank: dict[str, torch.Tensor] = {}
    renoise = opts.renoise_strength if opts.sampler != "ddim" else None
    noise_from: dict[int, list[str]] = {}
    rounds = []
    for r in range(1, opts.rounds + 1):
        folder = workdir / "rounds" / f"r{r}"
        if (folder / "round.json").exists():  # finished before an interruption: pick up its results
            generator = load_generator(folder / "generator", device=config.train.device)
            noise_bank, noise_from = _load_noise(folder)
            rounds.append(json.loads((folder / "round.json").read_text()))
            for key, value in rounds[-1].get("seconds", {}).items():  # time spent before the interruption counts
                seconds[key] += value
            continue
        spent_before = dict(seconds)
        t0 = time.perf_counter()
        # 1. generate
        plan = utility_plan(real, per_class=per_class(task, opts.per_round), round_name=f"r{r}", seed=config.generator.plan_seed,
                            noise_from=noise_from, noise_mix=opts.noise_mix, renoise_strength=renoise)
        synthetic = _generate(store, plan, generator, sampling, noise_bank, progress)
        seconds["generate"] += time.perf_counter() - t0
        # 2. value
        t0 = time.perf_counter()
        data = concat(real, synthetic)
        domains = torch.cat([torch.zeros(len(real)), torch.ones(len(synthetic))]).long()
        valued = fit_meta_weighted(data, task.val, replace(config.train, epochs=opts.valuation_epochs, steps=None, ssl="none"),
                                   MetaWeightConfig(meta_lr=opts.meta_lr), seed=config.seed, domains=domains,
                                   checkpoint_dir=folder / "valuation", progress=progress)
        utility = utilities(valued.model, valued.weight_net, data)
        u_real, u_syn = utility[: len(real)], utility[len(real):]
        ids = [row["id"] for row in synthetic.info["rows"]]
        store.set_scores({i: {f"utility_r{r}": round(float(u), 5)} for i, u in zip(ids, u_syn)})
        top, bottom = _extremes(synthetic.labels, u_syn, opts.top_share)
        seconds["value"] += time.perf_counter() - t0
        summary = {"round": r, "images": len(synthetic), "utility_real": _hist(u_real), "utility_synthetic": _hist(u_syn),
                   "mean_utility_real": float(u_real.mean()), "mean_utility_synthetic": float(u_syn.mean()),
                   "valuation_history": valued.history}
        # 3. model level: Diffusion-DPO on (high, low) pairs of the same class (first, so that the
        # policy below, the inverted noise above all, belongs to the generator that will use it)
        t0 = time.perf_counter()
        if opts.model_level:
            summary["dpo"] = generator.finetune_dpo(synthetic.images[top], synthetic.images[bottom], synthetic.labels[top],
                                                    steps=opts.dpo_steps, lr=opts.dpo_lr, beta=opts.dpo_beta,
                                                    seed=config.seed + r, progress=progress)
        seconds["model"] += time.perf_counter() - t0
        # 4. instance level: class embeddings and initial noise, from the high-utility images
        t0 = time.perf_counter()
        if opts.embedding:
            summary["embedding"] = generator.optimise_policy_embeddings(
                synthetic.images[top], synthetic.labels[top], steps=opts.embedding_steps, lr=opts.embedding_lr,
                proximity=opts.embedding_proximity, anchor=anchor, seed=config.seed + r, progress=progress)
        if opts.noise:
            kept = synthetic.images[top] if renoise else generator.invert_noise(
                synthetic.images[top], synthetic.labels[top], steps=opts.sampling_steps,
                guidance_scale=opts.inversion_guidance, guidance_interval=sampling.guidance_interval, progress=progress)
            noise_bank = {ids[i]: kept[k] for k, i in enumerate(top.tolist())}
            noise_from = {}
            for i in top.tolist():
                noise_from.setdefault(int(synthetic.labels[i]), []).append(ids[i])
        seconds["policy"] += time.perf_counter() - t0
        summary["seconds"] = {k: seconds[k] - spent_before[k] for k in ("generate", "value", "policy", "model")}
        summary["examples"] = {"highest": [ids[i] for i in top.tolist()], "lowest": [ids[i] for i in bottom.tolist()]}
        generator.save_pretrained(folder / "generator")
        _save_noise(folder, noise_bank, noise_from)
        atomic_write_json(folder / "round.json", summary)
        rounds.append(summary)

    # the final set, then the classifier on it (with and without the real images)
    t0 = time.perf_counter()
    plan = utility_plan(real, per_class=per_class(task, opts.final_multiple), round_name="final", seed=config.generator.plan_seed,
                        noise_from=noise_from, noise_mix=opts.noise_mix, renoise_strength=renoise)
    final = _generate(store, plan, generator, sampling, noise_bank, progress)
    seconds["generate"] += time.perf_counter() - t0
    result, metrics, spent = train_and_evaluate(concat(real, final), task, config, workdir=workdir, progress=progress)
    seconds.update(spent)
    synthetic_only, seconds["train_synthetic_only"] = _synthetic_only(final, task, config, workdir=workdir,
                                                                      progress=progress)
    extra = {
        # is the final set new (memorisation ratio about 1) and as varied as the real images (diversity ratio)?
        "memorization": memorization_ratio(final, real, task.val),
        "diversity_ratio": diversity_ratio(final, real),
        "utilgen": {"rounds": rounds, "synthetic_only": synthetic_only, "final_images": len(final),
                    "settings": {k: getattr(opts, k) for k in ("rounds", "embedding", "noise", "model_level", "sampler",
                                                               "sampling_steps", "noise_mix", "renoise_strength")},
                    "features": _feature_map(result.model, real, store, rounds, final)},
        "generator": {**generator_info, "fingerprint": generator.fingerprint()},
        "synthetic": {"planned": len(plan), "images": len(final), "store": str(store.root),
                      "counts_after": (real.class_counts() + final.class_counts()).tolist()},
    }
    return RecipeResult(metrics=metrics, model=result.model, history=result.history, seconds=seconds, extra=extra,
                        synthetic=final, figures=_examples(store, rounds, real.num_classes), curve=result.curve,
                        steps=result.steps)


def _examples(store: SyntheticStore, rounds: list[dict], classes: int) -> dict[str, torch.Tensor]:
    """The last round's highest- and lowest-utility images, up to 4 per class, class by class."""
    if not rounds:
        return {}
    out = {}
    for kind, ids in rounds[-1]["examples"].items():
        ds = store.load(ids=ids)
        by_id = {row["id"]: i for i, row in enumerate(ds.info["rows"])}
        order = [by_id[i] for i in ids if i in by_id]
        picks = [i for c in range(classes) for i in [j for j in order if int(ds.labels[j]) == c][:4]]
        out[kind] = ds.images[picks]
    return out

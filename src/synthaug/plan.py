"""Planners decide what to synthesise. A plan is a list of rows (`PlanRow`): a unique `id`,
the `label`, an optional `group`, the image's own `seed`, the `recipe`, its `kind`, and
whatever conditioning that kind needs. Generating is a pure function of a row, so a plan can
be sharded, retried and resumed."""

from __future__ import annotations

import hashlib
from typing import Literal, TypedDict

import torch

from .data.dataset import ImageDataset
from .errors import SynthaugError

# plain: the class (and group) alone; guided: SDEdit from a real image (`source`, `strength`);
# conditioned: conditioned on two real images (`sources`, `conditioning` mode); UtilGen's
# noised: from noise around an inverted image (`noise_from`, `noise_mix`) and renoised: from a
# stored image re-noised to `strength` (`noise_from`)
RowKind = Literal["plain", "guided", "conditioned", "noised", "renoised"]


class PlanRow(TypedDict, total=False):
    id: str  # unique in the plan; names the image's file
    label: int
    group: int | None
    seed: int  # the image's own seed (`row_seed`)
    recipe: str
    kind: RowKind
    conditioning: str  # what the image is conditioned on, as recorded in the store
    source: int  # guided: index of the real image
    strength: float  # guided, renoised: share of the sampling steps re-run
    sources: list[int]  # conditioned: indices of two real images of the class
    dropout: float  # conditioned with a Dropout operator: its rate
    noise_from: str  # noised, renoised: id of the high-utility image
    noise_mix: float  # noised: weight of the inverted noise


def row_seed(plan_seed: int, row_id: str) -> int:
    """An image's seed, from the plan seed and the row id alone (stable when a plan grows)."""
    return int(hashlib.sha256(f"{plan_seed}:{row_id}".encode()).hexdigest()[:8], 16)


def plan_cells(plan: list[dict]) -> dict[tuple, list[dict]]:
    """The plan's rows by (class, group) cell, each cell's rows in plan order."""
    cells: dict[tuple, list[dict]] = {}
    for row in plan:
        cells.setdefault((row["label"], row.get("group")), []).append(row)
    return cells


def balance_plan(data: ImageDataset, *, target_per_class: int | None = None, by_group: bool = False,
                 seed: int = 0, recipe: str = "synaug", fill: float = 1.0) -> list[dict]:
    """SYNAuG's uniformizing plan: for every class (or every (class, group) cell with
    `by_group`) below the target, rows for the missing images. The target defaults to the
    largest class (cell). `fill` < 1 fills that share of the imbalance in log space: a cell
    of n images goes up to target^fill x n^(1 - fill) (0.5: the geometric mean of n and the
    target, so 50:1 becomes about 7:1; an empty cell counts as one image), for a loss that
    corrects the rest (Balanced Softmax). Its rows are the first rows of the full fill's."""
    counts = data.class_counts()
    if by_group:
        if data.groups is None or not data.group_names:
            raise SynthaugError("balance by group needs a split with groups (split.kind=colored): set synaug.balance_groups=false")
        n_groups = len(data.group_names)
        cells = {(c, group): int(((data.labels == c) & (data.groups == group)).sum())
                 for c in range(data.num_classes) for group in range(n_groups)}
    else:
        cells = {(c, None): int(counts[c]) for c in range(data.num_classes)}
    largest = max(cells.values())
    target = largest if target_per_class is None else int(target_per_class)
    if by_group and target_per_class is not None:
        target = int(target_per_class) // len(data.group_names)
    if target < 1:
        raise SynthaugError(f"target of {target_per_class} images per class is impossible: use a positive number or leave it unset")
    if target < largest and target_per_class is not None:
        raise SynthaugError(f"synaug.target_per_class={target_per_class} is below the largest class ({largest} per cell): "
                            "raise it or leave it unset (uniformize to the largest class)")
    if not 0 < fill <= 1:
        raise SynthaugError(f"synaug.fill must be in (0, 1] (1: every class filled to the target), got {fill}")
    rows = []
    for (c, group), n in cells.items():
        goal = target if fill == 1 else round(target ** fill * max(n, 1) ** (1 - fill))
        for k in range(goal - n):
            row_id = f"{recipe}-c{c}" + ("" if group is None else f"-g{group}") + f"-{k:06d}"
            rows.append({
                "id": row_id, "label": c, "group": group, "seed": row_seed(seed, row_id), "recipe": recipe,
                "kind": "plain", "conditioning": "class" if group is None else "class+group",
            })
    return rows


SOURCES = ("other", "own")  # where a translated row's real image comes from: another class, or its own cell


def translated_rows(rows: list[dict], data: ImageDataset, *, share: float, strength=0.7, seed: int = 0,
                    source: str = "other") -> list[dict]:
    """Diff-Mix's inter-class translation (Wang et al., CVPR 2024): the first round(share x n)
    rows of each (class, group) cell start from a real image of `data` of another class (with
    groups, of the row's group), noised to `strength` and denoised under the row's class, so a
    tail cell gets the other classes' variety (stroke, slant, texture) in its own class's
    shape instead of near-copies of its few images. With `source="own"` the image is one of
    the row's own cell instead (DA-Fusion's variations, Trabucco et al., ICLR 2024): a real
    tail image re-drawn by the denoiser that all classes trained. The source is drawn uniformly
    over those images from the row's own seed. A translated row is renamed `<id>-t<source>`
    (a store never confuses it with the plain row) with its own seed; a cell with no such
    image stays plain. `strength` is one number or [low, high]."""
    if source not in SOURCES:
        raise SynthaugError(f"synaug.translate_from must be one of {', '.join(SOURCES)}, got '{source}'")
    low, high = strength_range(strength, "synaug.translate_strength")
    out = list(rows)
    position = {row["id"]: i for i, row in enumerate(rows)}
    for (label, group), cell in plan_cells(rows).items():
        pool = data.labels == label if source == "own" else data.labels != label
        if group is not None and data.groups is not None:
            pool &= data.groups == group
        members = pool.nonzero().flatten()
        if not len(members):
            continue
        for row in cell[:round(share * len(cell))]:
            g = torch.Generator().manual_seed(int(row["seed"]))
            image = int(members[torch.randint(len(members), (1,), generator=g)])
            row_id = f"{row['id']}-t{image}"
            s = row_seed(seed, row_id)
            out[position[row["id"]]] = {
                **row, "id": row_id, "seed": s, "kind": "guided", "conditioning": "image", "source": image,
                "strength": drawn_strength(low, high, s)}
    return out


def translation_targets(rows: list[dict], data: ImageDataset, gamma: float) -> torch.Tensor:
    """Soft targets (N, classes) for generated rows: a plain row's class alone; a translated
    row (`translated_rows`) strength^gamma on its class and the rest on its source's class
    (Diff-Mix's annotation: a light translation keeps much of its source)."""
    targets = torch.zeros(len(rows), data.num_classes)
    for i, row in enumerate(rows):
        kept = float(row["strength"]) ** gamma if row.get("source") is not None else 1.0
        targets[i, int(row["label"])] += kept
        if kept < 1:
            targets[i, int(data.labels[row["source"]])] += 1 - kept
    return targets


def slow_learnable(losses: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """TADA's split (seed 001): k-means with k=2 on each training example's loss early in
    training; the cluster with the higher mean loss is the slow-learnable set. A bool mask
    (all False when every loss is the same: nothing stands out)."""
    from sklearn.cluster import KMeans

    x = losses.detach().double().cpu().reshape(-1, 1)
    if len(x) < 2 or float(x.max() - x.min()) == 0.0:
        return torch.zeros(len(x), dtype=torch.bool)
    clusters = torch.as_tensor(KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(x.numpy()))
    slow = int(x[clusters == 1].mean() > x[clusters == 0].mean())
    return clusters == slow


def target_mask(losses: torch.Tensor, labels: torch.Tensor, *, per_class: bool = False, share: float | None = None,
                seed: int = 0) -> torch.Tensor:
    """Which examples TADA targets: the k-means split of `slow_learnable` (over all examples,
    or within each class with `per_class`), or the `share` of highest losses (of all
    examples, or of each class)."""
    groups = [torch.arange(len(losses))] if not per_class else \
        [torch.nonzero(labels == c).flatten() for c in labels.unique().tolist()]
    mask = torch.zeros(len(losses), dtype=torch.bool)
    for members in groups:
        if share is None:
            mask[members] = slow_learnable(losses[members], seed=seed)
        else:
            top = losses[members].argsort(descending=True, stable=True)[: round(share * len(members))]
            mask[members[top]] = True
    return mask


def strength_range(strength, key: str = "strength") -> tuple[float, float]:
    """A strength given as one number or as [low, high], checked to lie in (0, 1]."""
    try:
        low, high = (strength, strength) if isinstance(strength, (int, float)) else map(float, strength)
    except (TypeError, ValueError):
        low = high = -1
    if not 0 < low <= high <= 1:
        raise SynthaugError(f"{key} must be in (0, 1] (one number or [low, high] with low <= high), got {strength}")
    return float(low), float(high)


def drawn_strength(low: float, high: float, seed: int) -> float:
    """A row's strength in [low, high], from its seed (low when the range is one number)."""
    return low if low == high else round(low + (high - low) * ((seed % 10_007) / 10_006), 4)


def targeted_plan(data: ImageDataset, mask: torch.Tensor, *, variants: int, strength=0.5,
                  seed: int = 0, recipe: str = "tada") -> list[dict]:
    """`variants` image-guided rows per selected training example (`source` = its index in
    `data`, noised to `strength` and denoised under its label). `strength` is one number or
    a range [low, high] from which each row draws its own, from its seed."""
    if variants < 1:
        raise SynthaugError(f"variants per example must be >= 1, got {variants}")
    low, high = strength_range(strength)
    rows = []
    for i in torch.nonzero(torch.as_tensor(mask)).flatten().tolist():
        for k in range(variants):
            row_id = f"{recipe}-i{i:06d}-{k}"
            s = row_seed(seed, row_id)
            rows.append({
                "id": row_id, "label": int(data.labels[i]), "group": None if data.groups is None else int(data.groups[i]),
                "seed": s, "recipe": recipe, "kind": "guided", "conditioning": "image", "source": i,
                "strength": drawn_strength(low, high, s),
            })
    return rows


def conditioned_plan(data: ImageDataset, *, target_per_class: int | None = None, mode: str, seed: int = 0,
                     dropout: float = 0.3, recipe: str = "augcond", per_class: int | None = None) -> list[dict]:
    """AugCond's plan: rows that fill every class up to `target_per_class` (or, with
    `per_class`, that many rows per class), each conditioned on images of `data` of its class:
    `sources` = [the image, a second image of the class for the mixing modes]. The first image
    cycles through the class so each is used about equally; the second is drawn from the
    row's seed (the first again if the class has one image). `dropout` is the Dropout
    operators' rate, recorded on the rows that use it."""
    if (target_per_class if per_class is None else per_class) < 1:
        raise SynthaugError(f"{target_per_class or per_class} images per class is impossible: use a positive number")
    rows = []
    for c in range(data.num_classes):
        members = torch.nonzero(data.labels == c).flatten().tolist()
        if not members:
            continue
        for k in range(target_per_class - len(members) if per_class is None else per_class):
            row_id = f"{recipe}-{mode}-c{c}-{k:06d}"
            s = row_seed(seed, row_id)
            first = members[k % len(members)]
            others = [m for m in members if m != first] or [first]
            row = {"id": row_id, "label": c, "group": None, "seed": s, "recipe": recipe, "kind": "conditioned",
                   "conditioning": mode,
                   "sources": [first, others[s % len(others)]]}
            if "dropout" in mode:
                row["dropout"] = dropout
            rows.append(row)
    return rows


def utility_plan(data: ImageDataset, *, per_class: int, round_name: str, seed: int = 0,
                 noise_from: dict[int, list[str]] | None = None, noise_mix: float = 1.0,
                 renoise_strength: float | None = None, recipe: str = "utilgen") -> list[dict]:
    """UtilGen's plan for one round (`round_name` 'r1', 'r2', ...) or the final set ('final'):
    `per_class` class-conditioned rows per class. With `noise_from` ({class: ids of
    high-utility images}), row k of a class starts from noise around the inversion of the
    k-th of them (cycling): `noise_from` and `noise_mix` are recorded on the row; with
    `renoise_strength`, from that image itself noised to this strength (`strength` on the row)."""
    if per_class < 1:
        raise SynthaugError(f"{per_class} images per class is impossible: raise utilgen.per_round / final_multiple")
    rows = []
    for c in range(data.num_classes):
        sources = (noise_from or {}).get(c) or []
        for k in range(per_class):
            row_id = f"{recipe}-{round_name}-c{c}-{k:06d}"
            row = {"id": row_id, "label": c, "group": None, "seed": row_seed(seed, row_id), "recipe": recipe,
                   "kind": "plain", "conditioning": "class"}
            if sources and renoise_strength:
                row.update(kind="renoised", conditioning="class+image", noise_from=sources[k % len(sources)],
                           strength=renoise_strength)
            elif sources:
                row.update(kind="noised", conditioning="class+noise", noise_from=sources[k % len(sources)],
                           noise_mix=noise_mix)
            rows.append(row)
    return rows


def row_kind(row: PlanRow) -> RowKind:
    """The row's `kind` (rows made by hand without one: conditioned with `sources`, guided with
    `source`, else plain)."""
    if row.get("kind"):
        return row["kind"]
    return "conditioned" if row.get("sources") is not None else "guided" if row.get("source") is not None else "plain"


def split_by_kind(rows: list[dict], make) -> torch.Tensor | None:
    """When `rows` mix kinds (plain, image-guided, image-conditioned), their images made kind
    by kind with `make(rows)` and put back in row order; None when they are of one kind."""
    kinds = [row_kind(r) for r in rows]
    if len(set(kinds)) < 2:
        return None
    out = None
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        images = make([rows[i] for i in idx])
        if out is None:
            out = torch.empty(len(rows), *images.shape[1:], dtype=images.dtype)
        out[idx] = images
    return out

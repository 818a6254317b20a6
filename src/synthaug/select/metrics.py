"""Validation of a synthetic set against the real one (the survey's "validation" module):
feature arrays in, numbers out. Every function takes (N, D) feature tensors, so the same
metric works in any feature space (`select/features.py`).

- `frechet_distance`: FID's formula (Heusel et al. 2017) in the chosen space.
- `kernel_distance`: KID (Binkowski et al. 2018), unbiased MMD^2 with the cubic polynomial
  kernel, mean and std over subsets.
- `precision_recall`: k-NN manifolds (Kynkaanniemi et al. 2019): the share of synthetic
  samples inside the real manifold (fidelity) and of real samples inside the synthetic one.
- `density_coverage`: Naeem et al. 2020, the outlier-robust versions of the two.
- `diversity`: mean pairwise distance within each class, synthetic over real.
- `domain_gap`: cross-validated accuracy of a real-vs-synthetic logistic regression
  (0.5: the two cannot be told apart).
- `memorization_ratio`: nearest-neighbour distance of synthetic images to the training
  images against that of held-out real images (pixel space).
The train-on-synthetic, test-on-real accuracy (CAS) needs a classifier and lives in
`select/stage.py`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..data.dataset import ImageDataset
from ..errors import SynthaugError


def _as_float(x) -> torch.Tensor:
    x = torch.as_tensor(x).double()
    if x.ndim != 2:
        raise SynthaugError(f"features must be an (N, D) array, got shape {tuple(x.shape)}")
    return x


def frechet_distance(real, synthetic) -> float:
    """||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^(1/2)); 0 for identical Gaussians."""
    import scipy.linalg

    real, synthetic = _as_float(real).numpy(), _as_float(synthetic).numpy()
    if len(real) < 2 or len(synthetic) < 2:
        raise SynthaugError("the Frechet distance needs at least 2 real and 2 synthetic samples")
    mu_r, mu_s = real.mean(0), synthetic.mean(0)
    cov_r, cov_s = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(synthetic, rowvar=False))
    with warnings.catch_warnings():  # a singular product is handled below, as pytorch-fid does
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_r @ cov_s)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        offset = np.eye(len(cov_r)) * 1e-6
        covmean = scipy.linalg.sqrtm((cov_r + offset) @ (cov_s + offset))
    covmean = covmean.real
    return float(max(((mu_r - mu_s) ** 2).sum() + np.trace(cov_r) + np.trace(cov_s) - 2 * np.trace(covmean), 0.0))


def kernel_distance(real, synthetic, *, subsets: int = 10, subset_size: int = 1000, seed: int = 0) -> dict:
    """KID: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, over `subsets` random subsets of
    `subset_size` (capped by the smaller set). About 0 for sets from one distribution."""
    real, synthetic = _as_float(real), _as_float(synthetic)
    m = min(subset_size, len(real), len(synthetic))
    if m < 2:
        raise SynthaugError("KID needs at least 2 real and 2 synthetic samples")
    d = real.shape[1]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]]
        y = synthetic[torch.randperm(len(synthetic), generator=g)[:m]]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = 1 - torch.eye(m, dtype=x.dtype)
        mmd = (kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean()
        values.append(float(mmd))
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each sample to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise SynthaugError(f"a k-NN manifold with k={k} needs more than {k} samples, got {len(features)}: lower k")
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the 1st is the sample itself


def precision_recall(real, synthetic, *, k: int = 3) -> dict:
    """Precision: share of synthetic samples within the k-NN ball of some real sample.
    Recall: share of real samples within the k-NN ball of some synthetic sample."""
    real, synthetic = _as_float(real), _as_float(synthetic)
    cross = torch.cdist(synthetic, real)  # (S, R)
    precision = (cross <= knn_radii(real, k)[None, :]).any(1).double().mean()
    recall = (cross.T <= knn_radii(synthetic, k)[None, :]).any(1).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real, synthetic, *, k: int = 5) -> dict:
    """Density: how many real k-NN balls hold each synthetic sample, / k (about 1 for the same
    distribution, can exceed 1). Coverage: share of real samples whose k-NN ball holds a
    synthetic sample. A ball is open, as in Naeem et al. 2020 (a sample on its edge is out)."""
    real, synthetic = _as_float(real), _as_float(synthetic)
    inside = torch.cdist(synthetic, real) < knn_radii(real, k)[None, :]  # (S, R)
    return {"density": float(inside.double().sum(1).mean() / k), "coverage": float(inside.any(0).double().mean())}


def realism_scores(real, synthetic, *, k: int = 3, keep_real: float = 0.5) -> torch.Tensor:
    """Kynkaanniemi et al.'s realism score of each synthetic sample: max over real samples of
    (k-NN radius / distance to it), over the `keep_real` share of real samples with the
    smallest radii (the paper drops the half in sparse regions). >= 1: inside the manifold."""
    real, synthetic = _as_float(real), _as_float(synthetic)
    radii = knn_radii(real, k)
    keep = radii <= radii.quantile(keep_real)
    distances = torch.cdist(synthetic, real[keep]).clamp(min=1e-12)
    return (radii[keep][None, :] / distances).max(1).values.float()


def diversity(features, labels) -> dict[int, float]:
    """Per class: mean pairwise distance between the class's samples (0 for a class of one)."""
    features, labels = _as_float(features), torch.as_tensor(labels)
    out = {}
    for c in labels.unique().tolist():
        f = features[labels == c]
        n = len(f)
        out[int(c)] = float(torch.pdist(f).mean()) if n > 1 else 0.0
    return out


def diversity_ratio(synthetic: ImageDataset, real: ImageDataset) -> float:
    """Median over classes of the synthetic images' mean pairwise pixel distance divided by the
    real images': below 1, a class's generated images are more alike than its real ones."""
    syn, ref = (diversity(d.images.flatten(1), d.labels) for d in (synthetic, real))
    ratios = [syn[c] / ref[c] for c in syn if ref.get(c)]
    return float(torch.tensor(ratios).median()) if ratios else float("nan")


def domain_gap(real, synthetic, *, folds: int = 5, seed: int = 0) -> float:
    """Accuracy of a logistic regression telling real from synthetic features, cross-validated
    on equal numbers of each (0.5: indistinguishable; 1: always told apart). Each synthetic
    sample shares its fold with its nearest real sample, so a near-copy is never judged by a
    model that saw its original (which would push the score below chance)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    real, synthetic = _as_float(real).numpy(), _as_float(synthetic).numpy()
    n = min(len(real), len(synthetic))
    if n < folds:
        raise SynthaugError(f"the domain classifier needs at least {folds} real and {folds} synthetic samples")
    rng = np.random.default_rng(seed)
    x = np.concatenate([real[rng.permutation(len(real))[:n]], synthetic[rng.permutation(len(synthetic))[:n]]])
    y = np.concatenate([np.zeros(n), np.ones(n)])
    nearest = torch.cdist(torch.from_numpy(x[n:]), torch.from_numpy(x[:n])).argmin(1).numpy()
    groups = np.concatenate([np.arange(n), nearest])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return float(cross_val_score(model, x, y, cv=GroupKFold(n_splits=folds), groups=groups).mean())


def set_metrics(real, synthetic, real_labels, synthetic_labels, *, k: int = 3, density_k: int = 5,
                seed: int = 0) -> dict:
    """Every feature-space metric of a synthetic set against the real one, overall and the
    per-class diversity ratio (synthetic / real; below 1: less varied than the real images).
    `k`: precision/recall's neighbours (Kynkaanniemi et al.: 3); `density_k`: density and
    coverage's (Naeem et al.: 5)."""
    real, synthetic = _as_float(real), _as_float(synthetic)
    real_div, syn_div = diversity(real, real_labels), diversity(synthetic, synthetic_labels)
    ratio = {c: syn_div[c] / real_div[c] for c in syn_div if real_div.get(c, 0) > 0}
    return {
        "frechet_distance": frechet_distance(real, synthetic),
        "kernel_distance": kernel_distance(real, synthetic, seed=seed),
        **precision_recall(real, synthetic, k=k),
        **density_coverage(real, synthetic, k=density_k),
        "diversity_ratio": {"per_class": ratio, "mean": float(np.mean(list(ratio.values()))) if ratio else None},
        "domain_gap": domain_gap(real, synthetic, seed=seed),
    }


def nearest_distances(queries: torch.Tensor, references: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """L2 distance (pixel space, [0, 1]) of each query image to its nearest reference image."""
    q = queries.flatten(1).float() / 255
    r = references.flatten(1).float() / 255
    out = [torch.cdist(q[i : i + chunk], r).min(1).values for i in range(0, len(q), chunk)]
    return torch.cat(out) if out else torch.empty(0)


def memorization_ratio(synthetic: ImageDataset, train: ImageDataset, heldout: ImageDataset) -> dict:
    """Per class: median distance of synthetic images to their nearest training image of the
    class, divided by the same for held-out real images. About 1: new images, like fresh
    real ones; well below 1: the generator copies its training images."""
    per_class = {}
    for c, name in enumerate(train.classes):
        syn, ref, held = (ds.images[ds.labels == c] for ds in (synthetic, train, heldout))
        if len(syn) and len(ref) and len(held):
            d_syn = nearest_distances(syn, ref).median()
            d_held = nearest_distances(held, ref).median()
            per_class[name] = float(d_syn / d_held.clamp(min=1e-8))
    values = list(per_class.values())
    return {"per_class": per_class, "min": min(values) if values else None,
            "median": float(torch.tensor(values).median()) if values else None}

"""How abstract each latent is, from the classes of its top images, read against chance.

A latent whose top images are all one fine class is specific; one whose top images spread over
several fine classes of one coarse group (say tops: shirts, coats and pullovers) is abstract;
one spread across groups is mixed. The paper's claim is that this mix differs between models, so
each model's distribution comes with a bootstrap interval and with the same statistics for
random "latents" whose top images are drawn from the covered images by chance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from visae.analysis.stats import bootstrap_mean
from visae.data.hierarchy import Hierarchy
from visae.errors import VisaeError

CATEGORIES = ("specific", "abstract", "mixed", "too_few")


@dataclass
class LatentAbstraction:
    """Per-latent statistics over its top images' labels, all arrays of length h.

    purity, coarse_purity and entropy are NaN, and lca_depth -1, for a latent with no images.
    """

    n_images: np.ndarray  # int64: valid (non-pad) top images
    purity: np.ndarray  # float64: share of the largest fine class
    coarse_purity: np.ndarray  # float64: share of the largest coarse group
    entropy: np.ndarray  # float64: of the fine classes, in bits
    n_classes: np.ndarray  # int64: distinct fine classes
    lca_depth: np.ndarray  # int64: depth of the lowest common ancestor of the classes (root = 0)
    category: np.ndarray  # str: one of CATEGORIES
    share: float
    min_images: int

    def columns(self) -> dict[str, np.ndarray]:
        """The per-latent arrays by name, for a table (one row per latent)."""
        return {"n_images": self.n_images, "purity": self.purity, "coarse_purity": self.coarse_purity,
                "entropy_bits": self.entropy, "n_classes": self.n_classes, "lca_depth": self.lca_depth,
                "category": self.category}


def latent_abstraction(top_labels: np.ndarray, hierarchy: Hierarchy, *, share: float = 0.8,
                       min_images: int = 5) -> LatentAbstraction:
    """Classify each latent from its top images' labels (int [h, N], -1 at pads).

    specific: one fine class holds >= `share` of its images; abstract: not specific, and one
    coarse group holds >= `share` (with share <= 1, not specific implies two or more fine classes);
    mixed: neither; too_few: fewer than `min_images` images, not classified.
    """
    if not 0 < share <= 1:
        raise VisaeError(f"abstraction share must be in (0, 1]; got {share!r}")
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 1:
        raise VisaeError(f"abstraction min_images must be an integer >= 1; got {min_images!r}")
    labels = np.asarray(top_labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise VisaeError(f"top-image labels must be an integer array [latents, N]; got {labels.dtype} {labels.shape}")
    _check_labels(labels, hierarchy.n_classes, "top-image labels", pad=True)
    valid = labels >= 0
    n_images = valid.sum(axis=1)
    rows = np.nonzero(valid)[0]
    fine = _class_counts(rows, labels[valid], labels.shape[0], hierarchy.n_classes)
    coarse = _class_counts(rows, hierarchy.coarse_of[labels[valid]], labels.shape[0], len(hierarchy.coarse_names))
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = fine.max(axis=1).toarray().ravel() / n_images
        coarse_purity = coarse.max(axis=1).toarray().ravel() / n_images
        p = fine.data / np.repeat(n_images, np.diff(fine.indptr))
    entropy = np.bincount(np.repeat(np.arange(labels.shape[0]), np.diff(fine.indptr)), weights=-p * np.log2(p),
                          minlength=labels.shape[0])
    entropy[n_images == 0] = np.nan
    category = np.select([n_images < min_images, purity >= share, coarse_purity >= share],
                         ["too_few", "specific", "abstract"], default="mixed").astype(f"<U{max(map(len, CATEGORIES))}")
    return LatentAbstraction(n_images=n_images.astype(np.int64), purity=purity, coarse_purity=coarse_purity,
                             entropy=entropy, n_classes=np.diff(fine.indptr).astype(np.int64),
                             lca_depth=_lca_depths(labels, hierarchy), category=category, share=float(share),
                             min_images=min_images)


def _check_labels(labels: np.ndarray, n_classes: int, what: str, pad: bool) -> None:
    low = -1 if pad else 0
    if labels.size and (labels.min() < low or labels.max() >= n_classes):
        bad = labels[(labels < low) | (labels >= n_classes)][0]
        raise VisaeError(f"{what} hold class {bad}, outside 0..{n_classes - 1}" + (" (-1 pads)" if pad else "")
                         + "; the labels and the hierarchy's classes do not match")


def _class_counts(rows: np.ndarray, classes: np.ndarray, h: int, n_classes: int) -> sparse.csr_matrix:
    """Sparse [h, n_classes] image counts (duplicate entries are summed)."""
    return sparse.csr_matrix((np.ones(len(rows)), (rows, classes)), shape=(h, n_classes))


def _lca_depths(labels: np.ndarray, hierarchy: Hierarchy) -> np.ndarray:
    """Per row, the LCA depth of its valid labels: the shallowest pairwise LCA with one member
    (in a tree they all lie on that member's path); -1 for a row without labels."""
    anchor = labels.max(axis=1)
    pair = hierarchy.lca_depth_matrix[np.maximum(anchor, 0)[:, None], np.maximum(labels, 0)]
    depth = np.where(labels >= 0, pair, np.iinfo(np.int64).max).min(axis=1)
    return np.where(anchor >= 0, depth, -1).astype(np.int64)


def chance_top_labels(n_images: np.ndarray, covered_labels: np.ndarray, seed: int) -> np.ndarray:
    """Random latents: row i holds n_images[i] labels drawn without replacement from the covered
    images' labels, then -1 pads (int64 [h, max n_images])."""
    rng = np.random.default_rng(seed)
    out = np.full((len(n_images), int(n_images.max(initial=0))), -1, dtype=np.int64)
    for i, k in enumerate(n_images):
        out[i, :k] = covered_labels[rng.choice(len(covered_labels), size=k, replace=False)]
    return out


def summarize_abstraction(result: LatentAbstraction, covered_labels: np.ndarray, hierarchy: Hierarchy, *,
                          seed: int = 0, n_boot: int = 1000, n_bins: int = 10) -> dict:
    """A model's abstraction summary beside chance, JSON-able.

    For the model and for random latents (the same number of top images each, drawn from
    `covered_labels`, the labels of the images the index covers): counts and fractions per
    category, a purity histogram over the classified latents, and headline scores (mean purity,
    the fraction abstract among classified, mean LCA depth) with seeded 95% percentile-bootstrap
    intervals over latents; `excess` is model minus chance.
    """
    covered = np.asarray(covered_labels)
    if covered.ndim != 1 or not np.issubdtype(covered.dtype, np.integer):
        raise VisaeError(f"covered labels must be a 1-D integer array; got {covered.dtype} {covered.shape}")
    _check_labels(covered, hierarchy.n_classes, "covered labels", pad=False)
    if result.n_images.max(initial=0) > len(covered):
        raise VisaeError(f"a latent has {result.n_images.max()} top images but the covered labels hold only "
                         f"{len(covered)}; pass the labels of every image the index covers")
    rng = np.random.default_rng(seed)
    chance = latent_abstraction(chance_top_labels(result.n_images, covered, int(rng.integers(2**63))), hierarchy,
                                share=result.share, min_images=result.min_images)
    model_stats = _category_stats(result, rng, n_boot, n_bins)
    chance_stats = _category_stats(chance, rng, n_boot, n_bins)
    return {
        "settings": {"share": result.share, "min_images": result.min_images, "seed": seed, "n_boot": n_boot,
                     "confidence": 0.95, "n_covered_images": len(covered)},
        "hierarchy": hierarchy.describe(),
        "model": model_stats,
        "chance": chance_stats,
        "excess": {key: model_stats[key]["value"] - chance_stats[key]["value"]
                   for key in ("mean_purity", "abstract_fraction", "mean_lca_depth")},
    }


def _category_stats(result: LatentAbstraction, rng: np.random.Generator, n_boot: int, n_bins: int) -> dict:
    counts = {c: int((result.category == c).sum()) for c in CATEGORIES}
    total = len(result.category)
    classified = result.category != "too_few"
    hist, edges = np.histogram(result.purity[classified], bins=n_bins, range=(0.0, 1.0))
    return {
        "n_latents": total,
        "n_classified": int(classified.sum()),
        "counts": counts,
        "fractions": {c: n / total if total else float("nan") for c, n in counts.items()},
        "purity_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        "mean_purity": bootstrap_mean(result.purity[classified], rng, n_boot),
        "abstract_fraction": bootstrap_mean((result.category[classified] == "abstract").astype(np.float64), rng,
                                            n_boot),
        "mean_lca_depth": bootstrap_mean(result.lca_depth[classified].astype(np.float64), rng, n_boot),
    }

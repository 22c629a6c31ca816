"""Invariance across domains: does a latent still fire on its top images once they are redrawn?

The paper's photo-vs-drawing claim, made a number. Each latent's top images go through
deterministic domain shifts (grayscale, edge sketch, colour inversion, posterisation, blur:
`SHIFTS`, applied to the decoded image before the model's own preprocessing) and through the
model again. A latent's score on a shift is the fraction of its top images on which it still
fires at least `threshold` x its activation on the unshifted image, recomputed by the same
encoder (so a latent is compared with itself, not with the store's fp16 copy; how far the two
are apart is reported as a sanity number). Read against a baseline: the same fraction when the
"shifted" image is a random other image, i.e. how often the latent fires that strongly anyway.
A shift that leaves every image unchanged (grayscale on grayscale data) is flagged `identity`
and kept out of the headline numbers.

With a domain dataset of the same classes (ImageNet-R, ImageNet-Sketch), `domain_invariance`
scores each latent on that dataset's images of its dominant class instead.

`encoder_from_store` rebuilds the image -> image-level SAE activation map (max over patch
tokens) from a store's meta.json and an SAE checkpoint, exactly as extraction and the latent
index computed it: the store's model, layer and token layout, the store dtype's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from visae.analysis.stats import bootstrap_mean
from visae.errors import VisaeError
from visae.progress import counted

Encode = Callable[[list], np.ndarray]  # list of PIL images -> float32 [B, h] image-level activations
LoadImage = Callable[[int], Image.Image]  # store image index -> decoded image

POSTERISE_BITS = 2
BLUR_RADIUS_PER_SIDE = 1 / 32  # Gaussian blur radius as a fraction of the image's shorter side
HIST_BINS = 10  # score histogram: equal bins over [0, 1]
N_BOOTSTRAP = 1000
ENCODE_CHUNK_FLOATS = 1 << 24  # bound on the [images, patches, latents] block `encode` holds at once


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def grayscale(image: Image.Image) -> Image.Image:
    """Luma (ITU-R 601), back in three channels."""
    return _rgb(image).convert("L").convert("RGB")


def edge_sketch(image: Image.Image) -> Image.Image:
    """PIL's FIND_EDGES (a 3x3 Laplacian) on the luma, inverted: dark lines on white."""
    return ImageOps.invert(_rgb(image).convert("L").filter(ImageFilter.FIND_EDGES)).convert("RGB")


def invert(image: Image.Image) -> Image.Image:
    """Colour inversion, 255 - value in each channel."""
    return ImageOps.invert(_rgb(image))


def posterise(image: Image.Image) -> Image.Image:
    """Keep the top POSTERISE_BITS bits of each channel (4 levels)."""
    return ImageOps.posterize(_rgb(image), POSTERISE_BITS)


def blur(image: Image.Image) -> Image.Image:
    """Gaussian blur of radius BLUR_RADIUS_PER_SIDE x the shorter side (1 px at 32 px, 7 at 224)."""
    image = _rgb(image)
    return image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS_PER_SIDE * min(image.size)))


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "grayscale": grayscale, "edges": edge_sketch, "invert": invert, "posterise": posterise, "blur": blur,
}


@dataclass
class Scores:
    """One shift's (or the baseline's) per-latent scores and their summary."""

    name: str
    scores: np.ndarray  # float64 [h]: fraction of the latent's valid top images it still fires on; NaN without any
    n_valid: np.ndarray  # int64 [h]: top images scored (not padding, firing on the re-run original)
    identity: bool = False  # the shift changed no image: not part of the headline
    n_changed: int | None = None  # distinct top images the shift changed (None for the baseline)

    @property
    def scored(self) -> np.ndarray:
        return self.scores[self.n_valid > 0]

    def histogram(self) -> dict:
        counts, edges = np.histogram(self.scored, bins=HIST_BINS, range=(0.0, 1.0))
        return {"edges": edges.tolist(), "counts": counts.tolist()}


@dataclass
class InvarianceResult:
    shifts: dict[str, Scores]
    baseline: Scores
    threshold: float
    seed: int
    original_max_rel_deviation: float  # max |re-run original - top_values| / top_values over the top images
    n_original_silent: int  # top images on which the re-run original does not fire (left out)

    @property
    def headline_shifts(self) -> list[str]:
        return [name for name, s in self.shifts.items() if not s.identity]

    def summary(self) -> dict:
        """JSON-ready: per shift the headline (mean over scored latents, bootstrap 95% interval),
        its difference from the baseline (paired over latents), the histogram; then the baseline's."""
        out = {"threshold": self.threshold, "seed": self.seed,
               "original_max_rel_deviation": self.original_max_rel_deviation,
               "n_original_silent": self.n_original_silent,
               "n_latents_scored": int((self.baseline.n_valid > 0).sum()),
               "headline_shifts": self.headline_shifts, "shifts": {}}
        for i, (name, s) in enumerate(self.shifts.items()):
            entry = {"identity": s.identity, "n_changed": s.n_changed, "histogram": s.histogram(),
                     "headline": None, "minus_baseline": None}
            if not s.identity:
                entry["headline"] = mean_interval(s.scored, self.seed + 1 + i)
                entry["minus_baseline"] = mean_interval(s.scored - self.baseline.scored, self.seed + 1 + i)
            out["shifts"][name] = entry
        out["baseline"] = {"histogram": self.baseline.histogram(),
                           "headline": mean_interval(self.baseline.scored, self.seed)}
        return out

    def per_latent(self) -> dict[str, np.ndarray]:
        """Columns of a per-latent table: n_valid, each shift's score and the baseline's (NaN: unscored)."""
        return {"n_valid": self.baseline.n_valid, **{n: s.scores for n, s in self.shifts.items()},
                "baseline": self.baseline.scores}


def mean_interval(values: np.ndarray, seed: int, n_resamples: int = N_BOOTSTRAP) -> dict:
    """The mean with a seeded 95% bootstrap interval (visae.analysis.stats' format)."""
    return bootstrap_mean(values, np.random.default_rng(seed), n_resamples)


def _check_tops(top_images, top_values) -> tuple[np.ndarray, np.ndarray]:
    top_images, top_values = np.asarray(top_images), np.asarray(top_values)
    if top_images.ndim != 2 or top_images.shape != top_values.shape:
        raise VisaeError(f"top_images and top_values must both be [latents, N]; got {list(top_images.shape)} "
                         f"and {list(top_values.shape)}")
    if not np.issubdtype(top_images.dtype, np.integer):
        raise VisaeError(f"top_images must hold image indices (integers), got {top_images.dtype}")
    return top_images.astype(np.int64), top_values.astype(np.float64)


def _baseline_draws(top_images: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each top image, a uniform draw from `pool` (sorted, unique) other than that image; -1 at pads."""
    draws = np.full(top_images.shape, -1, dtype=np.int64)
    valid = top_images >= 0
    own = top_images[valid]
    at = np.minimum(np.searchsorted(pool, own), len(pool) - 1)
    in_pool = pool[at] == own
    k = rng.integers(0, len(pool) - in_pool)
    draws[valid] = pool[k + (in_pool & (k >= at))]
    return draws


class _Requests:
    """Entries (image, latent) of the flattened [h, N] table to read off encoded batches."""

    def __init__(self, positions: np.ndarray, latents: np.ndarray, slots: np.ndarray):
        order = np.argsort(positions, kind="stable")
        self.positions, self.latents, self.slots = positions[order], latents[order], slots[order]

    def fill(self, out: np.ndarray, acts: np.ndarray, start: int, stop: int, row_of=None) -> None:
        """Write acts[row, latent] into out[slot] for the requests of images [start, stop)."""
        lo, hi = np.searchsorted(self.positions, [start, stop])
        rows = self.positions[lo:hi] - start
        out[self.slots[lo:hi]] = acts[rows if row_of is None else row_of[rows], self.latents[lo:hi]]


def _encoded(encode: Encode, images: list, h: int) -> np.ndarray:
    acts = np.asarray(encode(images))
    if acts.shape != (len(images), h):
        raise VisaeError(f"the encoder returned activations shaped {list(acts.shape)} for {len(images)} images; "
                         f"expected [{len(images)}, {h}] (the top-image table's latents)")
    return acts


def invariance(encode: Encode, load_image: LoadImage, top_images, top_values, *,
               shifts: Sequence[str] = tuple(SHIFTS), threshold: float = 0.5, baseline_images, seed: int,
               batch_size: int = 64) -> InvarianceResult:
    """Score every latent on every shift of its top images, and on random other images (the baseline).

    `top_images` [h, N] store image indices (-1 pads), `top_values` [h, N] their activations in
    the store. Every distinct image (top image or baseline draw) is loaded and encoded once,
    and each top image once per shift, in batches of `batch_size`."""
    shifts = [shifts] if isinstance(shifts, str) else list(shifts)
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown or not shifts:
        raise VisaeError(f"unknown shift(s) {', '.join(unknown) or '(none given)'}: use some of {', '.join(SHIFTS)}")
    if not 0 < threshold <= 1:
        raise VisaeError(f"the invariance threshold must be in (0, 1], got {threshold}")
    if batch_size < 1:
        raise VisaeError(f"batch size must be positive, got {batch_size}")
    top_images, top_values = _check_tops(top_images, top_values)
    pool = np.unique(np.asarray(baseline_images, dtype=np.int64))
    if len(pool) < 2:
        raise VisaeError(f"the baseline needs at least 2 images to draw from, got {len(pool)}")
    h = top_images.shape[0]
    draws = _baseline_draws(top_images, pool, np.random.default_rng(seed))

    flat_images, flat_draws = top_images.reshape(-1), draws.reshape(-1)
    slots = np.flatnonzero(flat_images >= 0)
    latents = slots // top_images.shape[1]
    tops = np.unique(flat_images[slots])
    everything = np.union1d(tops, flat_draws[slots])
    top_reads = _Requests(np.searchsorted(everything, flat_images[slots]), latents, slots)
    draw_reads = _Requests(np.searchsorted(everything, flat_draws[slots]), latents, slots)
    is_top = np.isin(everything, tops)

    original, drawn = np.zeros(flat_images.size), np.zeros(flat_images.size)
    shifted = {name: np.zeros(flat_images.size) for name in shifts}
    changed = dict.fromkeys(shifts, 0)
    n = len(everything)
    for start in counted(range(0, n, batch_size), total=n, desc="invariance", unit="images",
                         size=lambda start: min(batch_size, n - start)):
        stop = min(start + batch_size, n)
        images = [load_image(int(i)) for i in everything[start:stop]]
        acts = _encoded(encode, images, h)
        top_reads.fill(original, acts, start, stop)
        draw_reads.fill(drawn, acts, start, stop)
        batch_tops = np.flatnonzero(is_top[start:stop])
        if not len(batch_tops):
            continue
        row_of = np.cumsum(is_top[start:stop]) - 1  # batch row -> row among the batch's top images
        for name in shifts:
            variants = [SHIFTS[name](images[j]) for j in batch_tops]
            changed[name] += sum(not np.array_equal(np.asarray(_rgb(images[j])), np.asarray(v))
                                 for j, v in zip(batch_tops, variants))
            top_reads.fill(shifted[name], _encoded(encode, variants, h), start, stop, row_of)

    original, drawn = original.reshape(h, -1), drawn.reshape(h, -1)
    pads = top_images < 0
    valid = ~pads & (original > 0)
    n_valid = valid.sum(1)
    stored = top_values[~pads]
    deviation = np.abs(original[~pads] - stored) / np.maximum(np.abs(stored), np.finfo(np.float32).tiny)

    def score(name: str, acts: np.ndarray, **kw) -> Scores:
        hits = (valid & (acts >= threshold * original)).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(n_valid > 0, hits / n_valid, np.nan)
        return Scores(name, frac, n_valid, **kw)

    return InvarianceResult(
        shifts={name: score(name, shifted[name].reshape(h, -1), identity=changed[name] == 0,
                             n_changed=changed[name]) for name in shifts},
        baseline=score("baseline", drawn), threshold=float(threshold), seed=int(seed),
        original_max_rel_deviation=float(deviation.max()) if deviation.size else 0.0,
        n_original_silent=int((~pads & ~valid).sum()))


def dominant_class(top_labels) -> np.ndarray:
    """Per latent, the most frequent class among its top images' labels (-1 pads; ties: the
    smaller class id; -1 for a latent without top images)."""
    top_labels = np.asarray(top_labels, dtype=np.int64)
    out = np.full(len(top_labels), -1, dtype=np.int64)
    for latent, row in enumerate(top_labels):
        row = row[row >= 0]
        if len(row):
            out[latent] = np.bincount(row).argmax()
    return out


def domain_invariance(encode: Encode, load_domain_image: LoadImage, domain_labels, top_labels, top_values, *,
                      threshold: float = 0.5, seed: int, batch_size: int = 64) -> dict:
    """Per latent, the fraction of a domain dataset's images of its dominant class (ImageNet-R,
    -Sketch: `domain_labels` [n] in the store dataset's class ids, one per domain image) on which
    it fires at least `threshold` x its median top-image activation; beside it, the same
    fraction on the domain images of the other classes (its baseline). Every domain image is
    encoded once (subsample `domain_labels`' images upstream to bound the cost). Returns
    per-latent `scores`, `baseline`, `dominant`, `n_images` (NaN / 0 for a latent whose class
    the domain lacks) and the two headlines."""
    if not 0 < threshold <= 1:
        raise VisaeError(f"the invariance threshold must be in (0, 1], got {threshold}")
    domain_labels = np.asarray(domain_labels, dtype=np.int64)
    if domain_labels.ndim != 1 or not len(domain_labels) or (domain_labels < 0).any():
        raise VisaeError("the domain dataset needs one class id (>= 0, the store dataset's) per image")
    top_labels, top_values = _check_tops(top_labels, top_values)
    h = len(top_labels)
    dominant = dominant_class(top_labels)
    valid = (top_labels >= 0) & (top_values > 0)
    median = np.array([np.median(v[m]) if m.any() else np.inf for v, m in zip(top_values, valid)])
    per_class = np.bincount(domain_labels, minlength=int(dominant.max(initial=-1)) + 1)
    same, other = np.zeros(h, dtype=np.int64), np.zeros(h, dtype=np.int64)
    n = len(domain_labels)
    for start in counted(range(0, n, batch_size), total=n, desc="domain invariance", unit="images",
                         size=lambda start: min(batch_size, n - start)):
        index = np.arange(start, min(start + batch_size, n))
        fires = _encoded(encode, [load_domain_image(int(i)) for i in index], h) >= threshold * median
        mine = domain_labels[index][:, None] == dominant[None, :]
        same += (fires & mine).sum(0)
        other += (fires & ~mine).sum(0)
    n_same = np.where(dominant >= 0, per_class[np.maximum(dominant, 0)], 0)
    n_other = np.where(n_same > 0, len(domain_labels) - n_same, 0)
    scores = np.where(n_same > 0, same / np.maximum(n_same, 1), np.nan)
    baseline = np.where(n_other > 0, other / np.maximum(n_other, 1), np.nan)
    return {"scores": scores, "baseline": baseline, "dominant": dominant, "n_images": n_same,
            "headline": mean_interval(scores[n_same > 0], seed),
            "baseline_headline": mean_interval(baseline[n_other > 0], seed)}


# -- the real encoder -------------------------------------------------------------------------

def store_to_dataset_index(n_images: int, skipped: list | None) -> np.ndarray:
    """Dataset index of each store image: extraction kept the readable images in order, leaving
    out those listed in meta.json's dataset.skipped_images."""
    bad = np.array(sorted({int(s["index"]) for s in skipped or []}), dtype=np.int64)
    return np.setdiff1d(np.arange(n_images + len(bad)), bad)[:n_images]


def _spec_from_meta(model: dict, weights) -> dict:
    """The model spec that rebuilds a store's model, from what meta.json records of it."""
    ident = model.get("identity") or {}
    spec = {"source": model.get("source"), "arch": model.get("arch"), "name": model.get("name"),
            "weights": str(weights) if weights is not None else model.get("weights"),
            "pretrained": ident.get("pretrained"), "model_kwargs": ident.get("model_kwargs") or {},
            "init_seed": ident.get("init_seed") or 0}
    size = ident.get("image_size") or model.get("image_size")
    if size and size[0] == size[1] and "img_size" not in spec["model_kwargs"]:
        spec["image_size"] = int(size[0])
    return spec


def check_same_model(backbone, model: dict, root: Path) -> None:
    """Refuse a rebuilt model whose identity (weights' sha256, init, kwargs, transform) differs
    from the one that made the store."""
    theirs = model.get("identity")
    if theirs is None:
        raise VisaeError(f"store {root} does not record its model's identity (made by an older visae): re-extract it")
    ours = backbone.identity
    differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differ:
        k = differ[0]
        raise VisaeError(f"the rebuilt model differs from the one that made store {root} in {', '.join(differ)} "
                         f"(store {theirs.get(k)!r}, rebuilt {ours.get(k)!r}): pass the weights file it was "
                         f"extracted with (--weights) or its config entry")


def encoder_from_store(store, sae, *, weights=None, device: str = "cpu",
                       model_spec: dict | None = None) -> tuple[Encode, LoadImage]:
    """(encode, load_image) for the model, layer and dataset of `store` and the SAE `sae`.

    `encode(images)` -> float32 [B, h]: the SAE's activation of each latent, max over the
    image's patch tokens, of the residual stream at the store's layer, rounded to the store's
    dtype as extraction stored it. `load_image(i)` decodes store image i (skipped images
    accounted for). The model is rebuilt from meta.json (`model_spec`, the model's config entry,
    overrides it; `weights` replaces the recorded weights path) and must have the identity the
    store records. `store`, `sae`: paths, or an open ActivationStore and a loaded SAE."""
    from visae.models import load_backbone
    from visae.sae import checkpoint as ckpt
    from visae.store import ActivationStore
    from visae.store.format import STORE_DTYPES

    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    sae = sae if isinstance(sae, torch.nn.Module) else ckpt.load(sae, device=device)
    ckpt.check_compatible(sae, store)
    meta = store.info
    if not isinstance(meta.model, dict) or not isinstance(meta.dataset, dict) or meta.layout.model is None:
        raise VisaeError(f"store {store.root} was not made by `visae extract` (no model or dataset recorded): "
                         f"invariance re-runs the model on the store's images")
    spec = dict(model_spec) if model_spec is not None else _spec_from_meta(meta.model, weights)
    if model_spec is not None and weights is not None:
        spec["weights"] = str(weights)
    if spec.get("source") == "pretrain" and not spec.get("weights"):
        raise VisaeError(f"store {store.root} was made by a `visae pretrain` model: pass its weights file (--weights)")
    backbone = load_backbone(spec)
    check_same_model(backbone, meta.model, store.root)
    if backbone.layout != meta.layout.model:
        raise VisaeError(f"the rebuilt model's token layout {backbone.layout} is not store {store.root}'s "
                         f"{meta.layout.model}")
    backbone.to(device)

    load_image = image_loader(store)

    layer, store_dtype = meta.layer, STORE_DTYPES[meta.dtype][1]
    patches = slice(backbone.layout.n_prefix, backbone.layout.n_tokens)
    rows = max(1, ENCODE_CHUNK_FLOATS // (backbone.layout.n_patches * sae.width))

    def encode(images: list) -> np.ndarray:
        pixels = torch.stack([backbone.transform(image) for image in images])
        with torch.inference_mode():
            resid = backbone.record(pixels.to(device), [layer])[layer][:, patches]
            tokens = resid.to(store_dtype).to(torch.float32)  # what the store holds, as the SAE reads it
            sae_device = sae.W_enc.device
            return torch.cat([sae.encode(tokens[i:i + rows].to(sae_device)).amax(dim=1)
                              for i in range(0, len(tokens), rows)]).float().cpu().numpy()

    return encode, load_image


def image_loader(store) -> LoadImage:
    """`load_image(i)`: store image i decoded from the store's dataset (skipped images accounted
    for), after checking the dataset still holds the images that were extracted."""
    from visae.data import open_dataset

    meta = store.info
    if not isinstance(meta.dataset, dict):
        raise VisaeError(f"store {store.root} records no dataset spec (not made by `visae extract`)")
    dataset = open_dataset(meta.dataset.get("spec") or {})
    total = meta.dataset.get("n_images_total")
    if len(dataset) != total:
        raise VisaeError(f"dataset {meta.dataset.get('name')} now has {len(dataset)} images, but store {store.root} "
                         f"was extracted from {total}: point its root at the same data")
    dataset_index = store_to_dataset_index(store.n_images, meta.dataset.get("skipped_images"))
    if not np.array_equal(dataset.label_array()[dataset_index], store.labels):
        raise VisaeError(f"dataset {meta.dataset.get('name')}'s labels differ from store {store.root}'s: "
                         f"its root holds other images than were extracted")

    def load_image(index: int) -> Image.Image:
        if not 0 <= index < store.n_images:
            raise VisaeError(f"image {index} is not in store {store.root} ({store.n_images} images)")
        return dataset[int(dataset_index[index])].image

    return load_image

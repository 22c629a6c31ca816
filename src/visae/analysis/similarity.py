"""Representation similarity of two models on the same images, per layer pair.

Latent matching compares what two SAEs found; these compare the models' own representations, so
a low match rate can be told apart from models that represent the images differently:
- debiased linear CKA (the unbiased HSIC estimator of Song et al. 2012, as Kornblith et al. 2019
  and Huh et al. 2024 use it), which, unlike plain CKA, is near 0 for independent data at
  finite n;
- mutual k-nearest neighbours (Huh et al. 2024): how many of each image's k nearest images
  (cosine) the two representations share.
Each is read against its permutation null (one side's images shuffled).
"""

from __future__ import annotations

import numpy as np
import torch

from visae.errors import VisaeError

POOLS = ("mean", "cls")


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise VisaeError(f"representations must be [n, d] over the same images, got shapes {x.shape} and {y.shape}")
    return x, y


def _unbiased_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al.'s unbiased HSIC of the linear kernels K = x xᵀ, L = y yᵀ with zeroed
    diagonals, from the features (never forming the n x n kernels):
    [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3))."""
    n = len(x)
    kx, ly = (x * x).sum(axis=1), (y * y).sum(axis=1)      # the kernels' diagonals
    trace = float(np.square(x.T @ y).sum() - kx @ ly)       # tr(K̃L̃)
    k_rows = x @ x.sum(axis=0) - kx                         # K̃1
    l_rows = y @ y.sum(axis=0) - ly                         # L̃1
    return (trace + k_rows.sum() * l_rows.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k_rows @ l_rows)) \
        / (n * (n - 3))


def debiased_cka(x, y) -> float:
    """Debiased linear CKA of x [n, d1] and y [n, d2] (float64; features centred first)."""
    x, y = _pair(x, y)
    if len(x) < 4:
        raise VisaeError(f"debiased CKA needs at least 4 images, got {len(x)}")
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    denom = np.sqrt(_unbiased_hsic(x, x) * _unbiased_hsic(y, y))
    return float(_unbiased_hsic(x, y) / denom) if denom > 0 else 0.0


def _knn(x: np.ndarray, k: int, chunk: int) -> torch.Tensor:
    """Each row's k nearest other rows by cosine similarity, [n, k]."""
    f = torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float32)), dim=1)
    out = torch.empty((len(f), k), dtype=torch.int64)
    for s in range(0, len(f), chunk):
        sim = f[s:s + chunk] @ f.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -torch.inf  # not itself
        out[s:s + chunk] = sim.topk(k, dim=1).indices
    return out


def mutual_knn(x, y, k: int = 10, *, chunk: int = 1024) -> float:
    """Mutual k-nearest-neighbour alignment: mean over images of |kNN_x(i) ∩ kNN_y(i)| / k,
    neighbours by cosine similarity, the image itself excluded (similarities in chunks of
    `chunk` rows, so memory is chunk x n)."""
    x, y = _pair(x, y)
    if not 1 <= k < len(x):
        raise VisaeError(f"mutual kNN needs 1 <= k < n images, got k={k} with n={len(x)}")
    nx, ny = _knn(x, k, chunk), _knn(y, k, chunk)
    shared = (nx[:, :, None] == ny[:, None, :]).any(dim=2).sum(dim=1)
    return float(shared.double().mean() / k)


@torch.no_grad()
def image_representations(store, images, pool: str = "mean", *, chunk: int = 256) -> np.ndarray:
    """One vector per image from an activation store (`visae.store.ActivationStore`): the mean
    over its patch tokens ("mean", in float64) or its CLS token ("cls"). float32 [len(images), d],
    in the order of `images` (store image indices), `chunk` images at a time, reading only their
    tokens of that kind (`ActivationStore.take`)."""
    if pool not in POOLS:
        raise VisaeError(f"unknown pool {pool!r}: use {' or '.join(POOLS)}")
    images = np.asarray(images, dtype=np.int64)
    if images.size and (images.min() < 0 or images.max() >= store.n_images):
        raise VisaeError(f"image indices must lie in [0, {store.n_images}) for store {store.root}, "
                         f"got {images.min()}..{images.max()}")
    tokens = store.token_index("patches" if pool == "mean" else "cls")
    out = np.empty((len(images), store.d_model), dtype=np.float32)
    for start in range(0, len(images), chunk):
        acts = store.take(images[start:start + chunk], tokens).to(torch.float64)
        out[start:start + chunk] = acts.mean(dim=1).numpy()
    return out


def similarity_rows(reps_a: dict, reps_b: dict, *, k: int = 10, seed: int = 0) -> list[dict]:
    """One row per (layer of A, layer of B): debiased CKA and mutual kNN, each beside its
    permutation null (B's rows shuffled with `seed`, one permutation for every pair)."""
    rows, perm = [], None
    for layer_a, x in reps_a.items():
        for layer_b, y in reps_b.items():
            x, y = _pair(x, y)
            if perm is None:
                perm = np.random.default_rng(seed).permutation(len(y))
            if len(perm) != len(y):
                raise VisaeError(f"layers cover different image counts ({len(perm)} vs {len(y)}): "
                                 f"give every layer the same images")
            rows.append({"layer_a": layer_a, "layer_b": layer_b, "n_images": len(x), "k": k, "seed": seed,
                         "cka": debiased_cka(x, y), "cka_null": debiased_cka(x, y[perm]),
                         "mutual_knn": mutual_knn(x, y, k), "mutual_knn_null": mutual_knn(x, y[perm], k)})
    return rows

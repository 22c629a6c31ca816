"""`visae synth`: a ground-truth activation store built from a planted dictionary.

x = Σ_j c_j · a_j + noise, with unit-norm atoms a_j ∈ R^d, codes c that have exactly k non-zero,
non-negative entries per token (atoms drawn uniformly, magnitudes |N(0,1)| + 0.5 so an active atom
is never negligible) and Gaussian noise of std `noise`. An SAE that works should find the atoms
among its decoder rows. The atoms are saved as `atoms.npy` beside the shards, so tests and reports can score recovery.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from visae.args import nonneg_float, nonneg_int, positive_int
from visae.atomic import atomic_path, clean_stale_temps
from visae.errors import VisaeError
from visae.store import StoreLayout, StoreMeta, StoreWriter
from visae.store.format import canonical_dtype, to_storage


def make_atoms(d: int, n_atoms: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(n_atoms, d, generator=g, dtype=torch.float64)
    return (a / a.norm(dim=1, keepdim=True)).to(torch.float32)


def synth_tokens(atoms: torch.Tensor, n: int, k: int, noise: float, g: torch.Generator) -> torch.Tensor:
    n_atoms, d = atoms.shape
    idx = torch.rand(n, n_atoms, generator=g).topk(k, dim=1).indices  # k distinct atoms per token
    mag = torch.randn(n, k, generator=g).abs() + 0.5
    x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=mag, mode="sum")
    return x + noise * torch.randn(n, d, generator=g)


def synth_store(out, *, d: int = 64, atoms: int = 256, k: int = 4, images: int = 256, tokens_per_image: int = 16,
                noise: float = 0.01, seed: int = 0, dtype: str = "float32", shard_images: int = 128,
                classes: int = 1) -> Path:
    """A store of tokens that are sparse sums of planted atoms; image i has label i % classes."""
    if d < 1 or atoms < 1 or images < 1 or tokens_per_image < 1:
        raise VisaeError("synth: --d, --atoms, --images and --tokens-per-image must be positive")
    if not (noise >= 0 and np.isfinite(noise)):
        raise VisaeError(f"synth: --noise must be a finite number >= 0, got {noise}")
    if not 1 <= k <= atoms:
        raise VisaeError(f"synth: --k must be between 1 and --atoms ({atoms}), got {k}")
    dtype = canonical_dtype(dtype)
    out = Path(out)
    A = make_atoms(d, atoms, seed)
    side = int(np.sqrt(tokens_per_image))
    grid = [side, tokens_per_image // side] if side * (tokens_per_image // side) == tokens_per_image else [1, tokens_per_image]
    meta = StoreMeta(model="synthetic", layer=0, dataset=f"synth-d{d}-a{atoms}-k{k}-s{seed}", dtype=dtype, d_model=d,
                     layout=StoreLayout.patches(grid), synth={"atoms": atoms, "k": k, "noise": noise, "seed": seed})
    job = {"synth": meta.synth, "d": d, "images": images, "tokens_per_image": tokens_per_image, "dtype": dtype,
           "classes": int(classes)}
    clean_stale_temps(out)
    writer = StoreWriter(out, meta, job, shard_images=shard_images, n_images=images)
    done = writer.open()
    with atomic_path(out / "atoms.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, A.numpy())
    for i in range(done, writer.n_shards):
        a, b = writer.shard_range(i)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i + 1)  # per shard: resumable
        x = synth_tokens(A, (b - a) * tokens_per_image, k, noise, g).reshape(b - a, tokens_per_image, d)
        labels = np.arange(a, b, dtype=np.int64) % max(1, int(classes))
        writer.write_shard(i, {"acts": to_storage(x, dtype), "labels": labels})
    return out


def load_atoms(store_dir) -> np.ndarray:
    path = Path(store_dir) / "atoms.npy"
    if not path.is_file():
        raise VisaeError(f"{store_dir} has no atoms.npy: it is not a `visae synth` store")
    return np.load(path)


def recovery(atoms: np.ndarray, decoder: np.ndarray) -> dict:
    """Cosine of each planted atom to its best decoder row (mean, min) and the Hungarian
    1-to-1 matched mean cosine."""
    from scipy.optimize import linear_sum_assignment
    a = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    w = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    cos = a @ w.T  # [atoms, latents]
    best = cos.max(axis=1)
    rows, cols = linear_sum_assignment(-cos)
    return {"mean_best_cos": float(best.mean()), "min_best_cos": float(best.min()),
            "frac_above_0.9": float((best >= 0.9).mean()), "hungarian_mean_cos": float(cos[rows, cols].mean())}


def cmd_synth(args) -> int:
    synth_store(args.out, d=args.d, atoms=args.atoms, k=args.k, images=args.images,
                tokens_per_image=args.tokens_per_image, noise=args.noise, seed=args.seed, dtype=args.dtype)
    print(f"wrote a synthetic store to {args.out}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("synth", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--d", type=positive_int, default=64, help="model dimension")
    p.add_argument("--atoms", type=positive_int, default=256, help="planted dictionary size")
    p.add_argument("--k", type=positive_int, default=4, help="active atoms per token")
    p.add_argument("--images", type=positive_int, default=256)
    p.add_argument("--tokens-per-image", type=positive_int, default=16)
    p.add_argument("--noise", type=nonneg_float, default=0.01)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_synth)

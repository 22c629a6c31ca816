"""`visae latents`: the latent index of an SAE, the table every later analysis reads.

On the held-out images of the SAE's store (images it was not trained on; at most `max_images` of
them, a seeded sample), in one pass:
- the image-level activation of each latent: its maximum over the image's patch tokens (the CLS
  token when the store holds no patches), kept as a sparse [images, latents] matrix;
- each latent's maximum, its top-N images (store image index, value, arg-max patch) and its
  firing frequency over images;
- per class, the fraction of the class's images a latent fires on and its mean image-level value.

Memory is bounded by one chunk of encoded tokens (`chunk_floats`), the running top-N table
[latents, N], the per-class sums [latents, classes] and the sparse matrix itself (its non-zeros:
about 8 bytes each). The arrays go to one safetensors file whose sha256 `index.json` records;
`index.json` is written last and marks the index done. `LatentIndex.load` checks both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.numpy import load_file, save_file

from visae.analysis.on_store import open_sae_on_store
from visae.args import device as device_arg, positive_int
from visae.atomic import atomic_path, clean_stale_temps, write_json
from visae.errors import VisaeError
from visae.layout import LATENT_ARRAYS, LATENT_INDEX, RUN_MARKER, Identity
from visae.progress import counted
from visae.provenance import provenance
from visae.store.format import sha256_file

INDEX_FORMAT = "visae-latent-index/1"
SAMPLE_SEED = 0x1A7E  # the seeded sample of held-out images when max_images caps them


class SparseRows:
    """A CSR matrix built chunk by chunk: each chunk's dense [rows, cols] block keeps only its
    non-zeros (or the entries `mask` marks), so memory follows the non-zeros, not rows x cols."""

    def __init__(self):
        self.data, self.indices, self.indptr, self.nnz = [], [], [np.zeros(1, dtype=np.int64)], 0

    def append(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows, cols = (values != 0 if mask is None else mask).nonzero(as_tuple=True)
        counts = np.bincount(rows.numpy(), minlength=len(values))
        self.data.append(values[rows, cols].numpy().astype(np.float32))
        self.indices.append(cols.numpy().astype(np.int32))
        self.indptr.append(self.nnz + np.cumsum(counts))
        self.nnz += int(counts.sum())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data float32, indices int32, indptr int64), as scipy's csr_matrix takes them."""
        return (np.concatenate(self.data) if self.data else np.zeros(0, np.float32),
                np.concatenate(self.indices) if self.indices else np.zeros(0, np.int32),
                np.concatenate(self.indptr).astype(np.int64))


@dataclass
class LatentIndex:
    """One SAE's latent index (see the module docstring); arrays indexed by latent, then by rank."""

    identity: Identity
    meta: dict  # index.json: params, classes, grid, store path, summary
    images: np.ndarray  # int64 [n] store image indices covered, ascending
    labels: np.ndarray  # int64 [n]
    acts: sp.csr_matrix  # float32 [n, h] image-level activation
    max_activation: np.ndarray  # float32 [h]
    frequency: np.ndarray  # float32 [h] fraction of covered images the latent fires on
    top_images: np.ndarray  # int64 [h, N] store image indices, -1 pads
    top_values: np.ndarray  # float32 [h, N]
    top_patch: np.ndarray  # int64 [h, N] row-major patch in the grid, -1 pads (or a CLS-only store)
    class_frequency: np.ndarray  # float32 [h, C]
    class_mean: np.ndarray  # float32 [h, C] mean image-level activation over the class's images

    @property
    def width(self) -> int:
        return int(self.max_activation.shape[0])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def alive(self) -> np.ndarray:
        """Latents that fire on at least one covered image."""
        return self.frequency > 0

    @property
    def top_labels(self) -> np.ndarray:
        """[h, N] class of each top image, -1 at pads."""
        pos = np.searchsorted(self.images, np.maximum(self.top_images, 0))
        return np.where(self.top_images >= 0, self.labels[np.minimum(pos, len(self.images) - 1)], -1)

    @classmethod
    def load(cls, directory: str | Path) -> LatentIndex:
        """A finished index, its arrays checked against the sha256 in index.json."""
        directory = Path(directory)
        marker = directory / LATENT_INDEX
        if not marker.is_file():
            raise VisaeError(f"{directory} holds no finished latent index (no {LATENT_INDEX}): run `visae latents`")
        try:
            meta = json.loads(marker.read_text())
        except ValueError as err:
            raise VisaeError(f"{marker} is not valid JSON ({err}): rerun `visae latents`") from None
        if meta.get("format") != INDEX_FORMAT:
            raise VisaeError(f"{marker} is not a {INDEX_FORMAT} file: rerun `visae latents`")
        arrays_path = directory / LATENT_ARRAYS
        if not arrays_path.is_file() or sha256_file(arrays_path) != meta.get("arrays_sha256"):
            raise VisaeError(f"{arrays_path} is missing or does not match the sha256 in {marker} "
                             f"(tampered or half-copied): rerun `visae latents`")
        a = load_file(str(arrays_path))
        n, h = len(a["images"]), len(a["max_activation"])
        acts = sp.csr_matrix((a["acts_data"], a["acts_indices"], a["acts_indptr"]), shape=(n, h))
        return cls(identity=Identity.from_file(meta, marker), meta=meta, images=a["images"], labels=a["labels"],
                   acts=acts, max_activation=a["max_activation"], frequency=a["frequency"],
                   top_images=a["top_images"], top_values=a["top_values"], top_patch=a["top_patch"],
                   class_frequency=a["class_frequency"], class_mean=a["class_mean"])


def pooled_tokens(store) -> tuple[np.ndarray, str]:
    """The token positions an image-level activation is the maximum over: the patches, else CLS."""
    stored = store.layout.stored
    kind = "patches" if "patches" in stored else "cls" if "cls" in stored else None
    if kind is None:
        raise VisaeError(f"store {store.root} holds neither patch nor CLS tokens ({', '.join(stored)})")
    return store.token_index(kind), kind


def covered_images(held: np.ndarray, max_images: int | None) -> np.ndarray:
    """The held-out images the index covers: all, or a seeded sample of `max_images`, ascending."""
    if max_images is None or max_images >= len(held):
        return np.asarray(held, dtype=np.int64)
    pick = np.random.default_rng(SAMPLE_SEED).choice(len(held), max_images, replace=False)
    return np.sort(np.asarray(held, dtype=np.int64)[pick])


@torch.no_grad()
def build_index(store_path, sae_path, *, top_n: int = 16, max_images: int | None = None,
                chunk_floats: int = 1 << 25, device: str = "cpu", allow_mismatch: bool = False) -> tuple[dict, dict]:
    """(index.json's content, the arrays) of the SAE at `sae_path` on its store's held-out images."""
    ctx = open_sae_on_store(store_path, sae_path, allow_mismatch=allow_mismatch, device=device)
    store, sae = ctx.store, ctx.sae
    tokens, kind = pooled_tokens(store)
    images = covered_images(ctx.held, max_images)
    h, n, p = sae.width, len(images), len(tokens)
    classes = list((store.info.dataset or {}).get("classes") or []) if isinstance(store.info.dataset, dict) else []
    labels = store.labels[images].astype(np.int64)
    if n and labels.min() < 0:
        raise VisaeError(f"store {store_path} has images without a class label (label {labels.min()}): the latent "
                         f"index needs image-level labels (a classification dataset, not a segmentation one)")
    n_classes = max(len(classes), int(labels.max()) + 1 if n else 0)
    n_top = min(top_n, n)
    top_v = torch.full((h, n_top), -1.0, dtype=torch.float32)  # -1: no image yet (activations are >= 0)
    top_i = torch.full((h, n_top), -1, dtype=torch.int64)
    top_p = torch.full((h, n_top), -1, dtype=torch.int64)
    class_count = torch.zeros((h, n_classes), dtype=torch.float64)
    class_sum = torch.zeros((h, n_classes), dtype=torch.float64)
    fires = torch.zeros(h, dtype=torch.float64)
    acts = SparseRows()
    step = max(1, chunk_floats // max(1, p * h))
    for lo in counted(range(0, n, step), total=n, desc=f"latents {ctx.config.get('name')}", unit="images",
                      size=lambda lo: min(step, n - lo)):
        chunk = images[lo:lo + step]
        x = store.take(chunk, tokens).to(device=device, dtype=torch.float32)
        f = sae.encode(x.reshape(-1, sae.d_model)).reshape(len(chunk), p, h)
        if not torch.isfinite(f).all():
            raise VisaeError(f"SAE {sae_path} gives non-finite activations on store {store_path}: the SAE is broken")
        value, patch = f.max(dim=1)  # [b, h]
        value, patch = value.cpu(), patch.cpu()
        on = value > 0
        fires += on.sum(0).double()
        onehot = torch.nn.functional.one_hot(torch.from_numpy(labels[lo:lo + step]), n_classes).double()
        class_count += on.double().T @ onehot
        class_sum += value.double().T @ onehot
        # the running top-N: ties go to the earlier image (a stable sort over [old | new])
        cand_v = torch.cat([top_v, torch.where(on, value, torch.full_like(value, -1.0)).T], dim=1)
        cand_i = torch.cat([top_i, torch.from_numpy(chunk).expand(h, -1)], dim=1)
        cand_p = torch.cat([top_p, patch.T], dim=1)
        order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :n_top]
        top_v, top_i, top_p = cand_v.gather(1, order), cand_i.gather(1, order), cand_p.gather(1, order)
        acts.append(value, on)
    pad = top_v < 0
    top_i[pad], top_p[pad] = -1, -1
    top_v = top_v.clamp_min(0)
    if kind != "patches":
        top_p[:] = -1
    per_class = torch.from_numpy(np.bincount(labels, minlength=n_classes)).double().clamp_min(1)
    arrays = {
        "images": images, "labels": labels,
        **dict(zip(("acts_data", "acts_indices", "acts_indptr"), acts.arrays())),
        "max_activation": top_v[:, 0].numpy().copy() if n_top else np.zeros(h, np.float32),
        "frequency": (fires / max(n, 1)).float().numpy(),
        "top_images": top_i.numpy(), "top_values": top_v.numpy(), "top_patch": top_p.numpy(),
        "class_frequency": (class_count / per_class).float().numpy(),
        "class_mean": (class_sum / per_class).float().numpy(),
    }
    freq = arrays["frequency"]
    meta = {
        "format": INDEX_FORMAT, "identity": store.identity(sae.config.get("name")).to_dict(),
        "entry": sae.config.get("entry"), "architecture": sae.config.get("architecture"),
        "store": str(store_path), "sae_path": str(sae_path), "sae_sha256": sae_weights_sha256(sae_path),
        "sae_seed": sae.config.get("seed"), "width": h, "d_model": sae.d_model,
        "classes": classes or [str(c) for c in range(n_classes)], "grid": list(store.layout.grid),
        "pooled_tokens": kind, "top_n": n_top, "images": n, "heldout_images": len(ctx.held),
        "heldout": ctx.heldout, "split_seed": ctx.split_seed,
        "sample": None if n == len(ctx.held) else {"max_images": max_images, "seed": SAMPLE_SEED},
        "image_set": image_set(store), "source_mismatch": ctx.mismatch,
        "summary": {"alive_fraction": float((freq > 0).mean()), "median_image_frequency": float(np.median(freq)),
                    "nonzeros": acts.nnz, "density": acts.nnz / max(1, n * h)},
    }
    return meta, arrays


def sae_weights_sha256(sae_path) -> str:
    """The sha256 of an SAE checkpoint's weights file: which SAE an index was made from."""
    from visae.sae.checkpoint import WEIGHTS

    path = Path(sae_path)
    return sha256_file(path if path.is_file() else path / WEIGHTS)


def reopen_sources(index: LatentIndex):
    """(store, SAE) an index was built from, refused with one line if either has changed since
    (re-extracted, retrained): later stages re-read a few of their images and must see the same."""
    from visae.sae import checkpoint as ckpt
    from visae.store import ActivationStore

    store = ActivationStore(index.meta["store"])
    if store.store_hash != index.identity.store_hash:
        raise VisaeError(f"store {index.meta['store']} changed since the latent index {index.identity.key} was "
                         f"built: rerun `visae latents`")
    if sae_weights_sha256(index.meta["sae_path"]) != index.meta.get("sae_sha256"):
        raise VisaeError(f"SAE {index.meta['sae_path']} changed since the latent index {index.identity.key} was "
                         f"built: rerun `visae latents`")
    return store, ckpt.load(index.meta["sae_path"])


def image_set(store) -> dict:
    """What makes two stores' image i the same image: the dataset's spec, the images left out,
    the count, and the labels' hash. Comparisons refuse stores whose image sets differ."""
    dataset = store.info.dataset if isinstance(store.info.dataset, dict) else {"name": store.info.dataset}
    spec = dict(dataset.get("spec") or {"name": dataset.get("name")})
    spec.pop("root", None)  # the same files may live elsewhere
    return {"dataset": spec, "n_images": store.n_images,
            "skipped": [s["index"] for s in dataset.get("skipped_images") or []],
            "labels_sha256": hashlib.sha256(np.ascontiguousarray(store.labels, dtype=np.int64).tobytes()).hexdigest()}


def write_index(out, meta: dict, arrays: dict, config: dict, started: float) -> None:
    """The arrays, provenance.json, then index.json (last: it marks the index done)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    (out / LATENT_INDEX).unlink(missing_ok=True)  # an older index's marker never outlives its arrays
    with atomic_path(out / LATENT_ARRAYS) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    meta = {**meta, "arrays_sha256": sha256_file(out / LATENT_ARRAYS)}
    write_json(out / RUN_MARKER, provenance(config, seeds={"sample": SAMPLE_SEED}, started=started))
    write_json(out / LATENT_INDEX, meta)


def cmd_latents(args) -> int:
    started = time.time()
    meta, arrays = build_index(args.store, args.sae, top_n=args.top, max_images=args.max_images,
                               device=args.device, allow_mismatch=args.allow_mismatch)
    write_index(args.out, meta, arrays, {"store": args.store, "sae": args.sae, "top": args.top,
                                         "max_images": args.max_images}, started)
    s = meta["summary"]
    print(f"{meta['identity']['sae']}: {meta['images']} images, {meta['width']} latents, "
          f"alive {s['alive_fraction']:.3f}, density {s['density']:.4f} -> {args.out}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("latents", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--sae", required=True, help="SAE checkpoint directory")
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=positive_int, default=16, help="top images kept per latent")
    p.add_argument("--max-images", type=positive_int, default=None,
                   help="index at most this many held-out images (a seeded sample); default all")
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="index an SAE trained on another model or layer than the store's")
    p.set_defaults(func=cmd_latents)

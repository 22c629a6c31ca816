"""`visae compare` and `visae similarity`: what two models' SAEs share, and how alike the models are.

`visae compare` matches the latents of two latent indexes one-to-one by the correlation of their
image-level activations on the same images (visae.analysis.matching), against a permutation null,
and lists the latents unique to each side with exemplars: their top images as thumbnails and
per-patch heatmaps of the latent (re-encoded from the store). Two SAEs of one model trained from
independent seeds give the seed baseline every cross-model number is read against.

`visae similarity` compares the models themselves: debiased linear CKA and mutual k-nearest
neighbours (visae.analysis.similarity) of image-level representations, per layer pair, on the
held-out images the indexes cover, each against its permutation null.

Two indexes or stores of different image sets are refused with one line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import save_file

from visae.analysis.latent_index import LatentIndex, covered_images, image_set, pooled_tokens, reopen_sources
from visae.store.format import sha256_file
from visae.args import device as device_arg, nonneg_int, open_fraction, positive_int, unit_fraction
from visae.atomic import atomic_path, clean_stale_temps, write_json
from visae.errors import VisaeError
from visae.layout import EXEMPLARS, MATCHES, MATCHING, RUN_MARKER, SIMILARITY
from visae.provenance import provenance

EXEMPLAR_LATENTS = 8  # unique latents shown per side
EXEMPLAR_IMAGES = 8  # top images per shown latent
THUMBNAIL = 96  # pixels: the longest side of a stored exemplar thumbnail
MIN_COMMON_IMAGES = 10


def check_same_images(set_a: dict, set_b: dict, what_a: str, what_b: str) -> None:
    """Refuse two image sets that are not the same images in the same order."""
    if set_a != set_b:
        da, db = set_a.get("dataset", {}), set_b.get("dataset", {})
        raise VisaeError(f"{what_a} and {what_b} are of different image sets ({da.get('name')} {da.get('split', '')}, "
                         f"{set_a.get('n_images')} images vs {db.get('name')} {db.get('split', '')}, "
                         f"{set_b.get('n_images')} images): compare stores extracted from one dataset")


def aligned_acts(a: LatentIndex, b: LatentIndex):
    """The two image-level activation matrices on the images both indexes cover, in one order."""
    check_same_images(a.meta["image_set"], b.meta["image_set"], f"index {a.identity.key}", f"index {b.identity.key}")
    common = np.intersect1d(a.images, b.images)
    if len(common) < MIN_COMMON_IMAGES:
        raise VisaeError(f"indexes {a.identity.key} and {b.identity.key} share {len(common)} images "
                         f"(< {MIN_COMMON_IMAGES}): index them on the same held-out split")
    rows_a, rows_b = np.searchsorted(a.images, common), np.searchsorted(b.images, common)
    return a.acts[rows_a].tocsr(), b.acts[rows_b].tocsr(), common


@torch.no_grad()
def latent_heatmaps(store, sae, latents, images: np.ndarray) -> np.ndarray:
    """[len(latents), images.shape[1], gh, gw]: each latent's activation on each patch of its
    images (re-encoded from the store; -1 pads stay zero)."""
    tokens, kind = pooled_tokens(store)
    gh, gw = store.layout.grid if kind == "patches" else (1, 1)
    out = np.zeros((len(latents), images.shape[1], gh, gw), dtype=np.float32)
    for row, (latent, imgs) in enumerate(zip(latents, images)):
        valid = imgs >= 0
        if valid.any():
            x = store.take(imgs[valid], tokens).float()
            f = sae.encode(x.reshape(-1, sae.d_model))[:, int(latent)].reshape(int(valid.sum()), gh, gw)
            out[row, valid] = f.numpy()
    return out


def thumbnails(store, images: np.ndarray) -> np.ndarray:
    """[*images.shape, S, S, 3] uint8 thumbnails of store images (centre-cropped squares; pads black)."""
    from PIL import ImageOps

    from visae.analysis.invariance import image_loader

    flat = images.reshape(-1)
    out = np.zeros((len(flat), THUMBNAIL, THUMBNAIL, 3), dtype=np.uint8)
    if not isinstance(store.info.dataset, dict):  # a `visae synth` store has no images: blank thumbnails
        return out.reshape(*images.shape, THUMBNAIL, THUMBNAIL, 3)
    load = image_loader(store)
    for i, img in enumerate(flat.tolist()):
        if img >= 0:
            out[i] = np.asarray(ImageOps.fit(load(img).convert("RGB"), (THUMBNAIL, THUMBNAIL)))
    return out.reshape(*images.shape, THUMBNAIL, THUMBNAIL, 3)


def exemplars(index: LatentIndex, latents: np.ndarray) -> dict:
    """The latents' top images: store indices, values, patch heatmaps and thumbnails."""
    store, sae = reopen_sources(index)
    latents = np.asarray(latents, dtype=np.int64)
    images = index.top_images[latents, :EXEMPLAR_IMAGES]
    return {"latents": latents, "images": images, "values": index.top_values[latents, :EXEMPLAR_IMAGES],
            "heatmaps": latent_heatmaps(store, sae, latents, images), "thumbnails": thumbnails(store, images)}


def compare_indexes(a_dir, b_dir, *, threshold: float = 0.5, seed: int = 0,
                    device: str = "cpu") -> tuple[dict, dict, dict]:
    """(matching.json's content, per-latent rows of each side, exemplar arrays)."""
    from visae.analysis.matching import match_latents

    a, b = LatentIndex.load(a_dir), LatentIndex.load(b_dir)
    acts_a, acts_b, common = aligned_acts(a, b)
    fired = {"a": acts_a.getnnz(0), "b": acts_b.getnnz(0)}
    result = match_latents(acts_a, acts_b, threshold=threshold, alive_a=fired["a"] > 0, alive_b=fired["b"] > 0,
                           null_seed=seed, device=device)
    ia, ib = a.identity, b.identity
    kind = "cross-model"
    if (ia.model, ia.layer) == (ib.model, ib.layer):
        # two SAEs of one model: a seed baseline only if their initialisations are independent
        same = a.meta.get("sae_seed") is not None and a.meta.get("sae_seed") == b.meta.get("sae_seed")
        kind = "same seed" if same else "seed baseline"
    # shown: the most unique latents that fire on enough images for their correlations to mean something
    shown = {side: [j for j in result[f"unique_{side}"] if fired[side][j] >= EXEMPLAR_IMAGES][:EXEMPLAR_LATENTS]
             for side in ("a", "b")}
    arrays = {side: exemplars(idx, np.asarray(shown[side], dtype=np.int64)) for side, idx in (("a", a), ("b", b))}
    s = result["summary"]
    summary = {
        "kind": kind, "identity_a": ia.to_dict(), "identity_b": ib.to_dict(), "images": len(common),
        "threshold": threshold, "seed": seed, **s,
        # the headline: the fraction of A's live latents with a partner above the threshold
        "matched_fraction": s["matched_fraction_a"], "null_matched_fraction": s["null_matched_fraction_a"],
        "mean_matched_correlation": s["mean_match_correlation"],
        "exemplars": {side: [int(j) for j in arrays[side]["latents"]] for side in ("a", "b")},
    }
    rows = {side: pd.DataFrame({"latent": np.arange(len(result[f"partner_{side}"])),
                                "match": result[f"partner_{side}"],
                                "matched_correlation": result[f"match_correlation_{side}"],
                                "best_correlation": result[f"best_{side}"],
                                "best_partner": result[f"best_partner_{side}"],
                                "alive": np.isfinite(result[f"best_{side}"]).astype(int)}) for side in ("a", "b")}
    return summary, rows, arrays


def write_compare(out, summary: dict, rows: dict, arrays: dict, config: dict, started: float) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    (out / MATCHING).unlink(missing_ok=True)
    with atomic_path(out / MATCHES) as tmp:
        pd.concat([frame.assign(side=side)[["side", *frame.columns]] for side, frame in rows.items()]).to_csv(
            tmp, index=False, float_format="%.6g")
    with atomic_path(out / EXEMPLARS) as tmp:
        save_file({f"{side}_{k}": np.ascontiguousarray(v) for side in arrays for k, v in arrays[side].items()}, str(tmp))
    summary = {**summary, "files_sha256": {name: sha256_file(out / name) for name in (MATCHES, EXEMPLARS)}}
    write_json(out / RUN_MARKER, provenance(config, seeds={"null": summary["seed"]}, started=started))
    write_json(out / MATCHING, summary)


def cmd_compare(args) -> int:
    started = time.time()
    summary, rows, arrays = compare_indexes(args.a, args.b, threshold=args.threshold, seed=args.seed,
                                            device=args.device)
    write_compare(args.out, summary, rows, arrays, {"a": args.a, "b": args.b, "threshold": args.threshold,
                                                   "seed": args.seed}, started)
    print(f"{summary['kind']}: matched {summary['matched_fraction']:.3f} at r > {args.threshold} "
          f"(null {summary['null_matched_fraction']:.3f}) -> {args.out}")
    return 0


def image_level(stores, images: np.ndarray) -> dict:
    """Per store (one layer each): the images' image-level representations, by pool."""
    from visae.analysis.similarity import image_representations

    return {store.info.layer: {pool: image_representations(store, images, pool)
                               for pool in ("mean", "cls") if pool == "mean" or "cls" in store.layout.stored}
            for store in stores}


def similarity(a_stores: list[str], b_stores: list[str], *, knn: int = 10, seed: int = 0, heldout: float = 0.1,
               split_seed: int = 0, max_images: int | None = None) -> dict:
    """similarity.json: CKA and mutual kNN of every layer of model A against every layer of B."""
    from visae.analysis.similarity import similarity_rows
    from visae.sae.split import split_images
    from visae.store import ActivationStore

    opened_a = [ActivationStore(p, verify=True) for p in a_stores]
    opened_b = [ActivationStore(p, verify=True) for p in b_stores]
    set_a = image_set(opened_a[0])
    for store in [*opened_a[1:], *opened_b]:  # before reading any tokens: the same images everywhere
        check_same_images(set_a, image_set(store), f"store {a_stores[0]}", f"store {store.root}")
    _, held = split_images(opened_a[0].n_images, heldout, split_seed)
    images = covered_images(held, max_images)
    reps_a, reps_b = image_level(opened_a, images), image_level(opened_b, images)
    rows = []
    for pool in ("mean", "cls"):
        pa = {layer: r[pool] for layer, r in reps_a.items() if pool in r}
        pb = {layer: r[pool] for layer, r in reps_b.items() if pool in r}
        if pa and pb:
            rows += [{"pool": pool, **row} for row in similarity_rows(pa, pb, k=knn, seed=seed)]
    name = lambda m: m.get("name") if isinstance(m, dict) else m  # noqa: E731
    return {"model_a": name(opened_a[0].info.model), "model_b": name(opened_b[0].info.model),
            "dataset": set_a["dataset"].get("name"), "images": len(images), "knn": knn, "seed": seed,
            "heldout": heldout, "split_seed": split_seed, "rows": rows}


def cmd_similarity(args) -> int:
    started = time.time()
    result = similarity(args.a, args.b, knn=args.knn, seed=args.seed, heldout=args.heldout,
                        split_seed=args.split_seed, max_images=args.max_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    (out / SIMILARITY).unlink(missing_ok=True)
    write_json(out / RUN_MARKER, provenance(vars(args) | {"func": None}, seeds={"null": args.seed}, started=started))
    write_json(out / SIMILARITY, result)
    for row in result["rows"]:
        print(f"{row['pool']} layer {row['layer_a']} vs {row['layer_b']}: CKA {row['cka']:.3f} "
              f"(null {row['cka_null']:.3f}), mutual kNN {row['mutual_knn']:.3f} (null {row['mutual_knn_null']:.3f})")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--a", required=True, help="latent index folder of model A's SAE (`visae latents`)")
    p.add_argument("--b", required=True, help="latent index folder of model B's SAE")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=unit_fraction, default=0.5, help="a pair is matched above this correlation")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the permutation null")
    p.add_argument("--device", type=device_arg, default="cpu", help="where the correlations' products run")
    p.set_defaults(func=cmd_compare)
    s = subparsers.add_parser("similarity", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--a", nargs="+", required=True, help="model A's stores (one per layer)")
    s.add_argument("--b", nargs="+", required=True, help="model B's stores")
    s.add_argument("--out", required=True)
    s.add_argument("--knn", type=positive_int, default=10)
    s.add_argument("--seed", type=nonneg_int, default=0)
    s.add_argument("--heldout", type=open_fraction, default=0.1, help="the held-out fraction of the SAEs' split")
    s.add_argument("--split-seed", type=nonneg_int, default=0)
    s.add_argument("--max-images", type=positive_int, default=None)
    s.set_defaults(func=cmd_similarity)

"""`visae intervene`: edit SAE latents inside the ViT and score the change on a task probe.

The paper's §5 as a table with baselines. At block L the residual stream x becomes
(x - x̂) + decode(f'), f' = f with chosen latents set to `scale x` their maximum observed activation
(the latent index's), the reconstruction error kept (`visae.models.edit.LatentEdit`); the rest of
the model and the probe (`visae probe`) run unchanged, on the probe's test images.

Latents are chosen on the probe's TRAINING images only:
- classification: per class c the alive latent of highest selectivity
  P(fires | c) - max_{c' != c} P(fires | c'), where "fires" is the image-level activation (the
  maximum over the patch tokens, as the latent index pools it) being > 0;
- segmentation: per class c the latent and threshold t (of `--thresholds`) with the best F1 of
  "patch activation > t" against "patch label == c", among alive latents that fire on at most
  `--max-frequency` of the training patches; or the latents `--latents-json` names (`manual`).

Each chosen latent's edit is read against baselines: `random_latent` (a seeded draw among the
latents the choice could pick, nearest in firing frequency on the same training images: image
level for classification, patch level for segmentation; never a chosen one), `random_direction`
(a seeded unit vector in d_model, scaled on each token to the norm the latent edit has there)
and, for classification, `probe_direction` (the final features moved as far as the latent edit
moved them, along the probe's own weight direction for the class: an upper bound).

Each test batch runs the blocks up to L once; every edit of that batch then runs only the blocks
after L (`Backbone.tokens_after`). The first batch checks that shortcut's plain pass against
`Backbone.final_tokens`; where they differ (a model whose blocks cannot run on their own) every
edit goes through `final_tokens` with the edit hook instead.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from visae.args import device as device_arg, json_object, nonneg_int, positive_int
from visae.atomic import atomic_path, clean_stale_temps, write_json
from visae.analysis.stats import bootstrap_mean
from visae.analysis.probes import confusion_matrix, iou_from_confusion, pixel_predictions, task_batches
from visae.errors import VisaeError
from visae.layout import (INTERVENTION, INTERVENTION_CLASSES, INTERVENTION_DOSE, INTERVENTION_EXAMPLES,
                          TASKS)
from visae.models.edit import WHERE, DirectionEdit, LatentEdit, token_mask

N_NEAREST = 10  # the random latent is drawn among this many alive latents nearest in frequency
ENCODE_CHUNK_FLOATS = 1 << 24  # bound on the [tokens, latents] block the training pass encodes at once
TAIL_RTOL = 1e-4  # running the blocks after L on their own must match final_tokens this closely
TAIL_ROWS = 2048  # images per pass through the blocks after L (edits of a batch run together)
CLASSIFICATION_METHODS = ("latent", "random_latent", "random_direction", "probe_direction")
SEGMENTATION_METHODS = ("latent", "manual", "random_latent", "random_direction")
CLASSIFICATION_COLUMNS = ["class", "class_name", "method", "latent", "n_images", "p_before", "p_after",
                          "delta_prob", "acc_before", "acc_after", "delta_acc", "other_acc_before",
                          "other_acc_after", "other_delta_acc", "flip_rate"]
SEGMENTATION_COLUMNS = ["class", "class_name", "method", "latent", "f1", "threshold", "n_target_patches",
                        "target_change", "other_change", "miou_after"]


# -- the arithmetic (pure functions on predictions) -----------------------------------------------

def change_counts(before, after, cls: int) -> tuple[int, int, int, int]:
    """(changed among `cls` before, predicted `cls` before, changed among the rest, the rest)."""
    before, after = np.asarray(before).ravel(), np.asarray(after).ravel()
    target, changed = before == cls, before != after
    return (int((changed & target).sum()), int(target.sum()), int((changed & ~target).sum()), int((~target).sum()))


def rate(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def change_rates(before, after, cls: int) -> tuple[float, float]:
    """(target, other): among predictions that were `cls`, the fraction that changed; among all
    other predictions, the fraction that changed. NaN where there is none."""
    t_changed, t_total, o_changed, o_total = change_counts(before, after, cls)
    return rate(t_changed, t_total), rate(o_changed, o_total)


def flip_rate(before, after, target: int) -> float:
    """Among predictions that were not `target`, the fraction that became `target`."""
    before, after = np.asarray(before).ravel(), np.asarray(after).ravel()
    candidates = before != target
    return rate(int((after[candidates] == target).sum()), int(candidates.sum()))


def accuracy(pred, labels) -> float:
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float((pred == labels).mean()) if len(pred) else math.nan


def selectivity(fire_rate: np.ndarray) -> np.ndarray:
    """[h, C]: P(fires | c) - max over the other classes of P(fires | c'), from P(fires | c) [h, C]."""
    fire_rate = np.asarray(fire_rate, dtype=np.float64)
    if fire_rate.shape[1] < 2:
        return fire_rate.copy()
    top2 = -np.sort(-fire_rate, axis=1)[:, :2]
    first = fire_rate.argmax(axis=1)
    best_other = np.where(np.arange(fire_rate.shape[1])[None, :] == first[:, None], top2[:, 1:2], top2[:, 0:1])
    return fire_rate - best_other


def best_f1(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray, eligible: np.ndarray):
    """Per class the (latent, threshold index, F1) of the best F1 = 2 TP / (predicted + true) over
    thresholds and eligible latents; tp [T, h, C], n_pred [T, h], n_true [C], eligible [h] bool.
    Ties go to the lower threshold, then the lower latent; a class without patches gets F1 NaN."""
    denom = n_pred[:, :, None] + n_true[None, None, :]
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    f1 = np.where(eligible[None, :, None], f1, -1.0)
    T, h, C = f1.shape
    flat = f1.reshape(T * h, C).argmax(axis=0)
    thr, latent = np.divmod(flat, h)
    score = f1[thr, latent, np.arange(C)]
    return latent, thr, np.where(n_true > 0, score, np.nan)


def matched_random_latents(chosen: list[int], frequency: np.ndarray, alive: np.ndarray, rng, n: int = N_NEAREST,
                           exclude=()) -> list[int]:
    """For each chosen latent a seeded draw among the `n` alive latents nearest in frequency (ties:
    the lower index), never a chosen one or one in `exclude`."""
    banned = set(int(j) for j in chosen) | set(int(j) for j in exclude)
    pool = np.array([j for j in np.flatnonzero(alive) if int(j) not in banned], dtype=np.int64)
    if not len(pool):
        raise VisaeError("no alive latent is left for the random-latent baseline (every alive latent is chosen)")
    out = []
    for j in chosen:
        gap = np.abs(frequency[pool].astype(np.float64) - float(frequency[j]))
        near = pool[np.lexsort((pool, gap))[:n]]
        out.append(int(near[rng.integers(len(near))]))
    return out


def mean_std(values) -> dict:
    """{"mean", "std"} over classes (NaN rows left out; std with ddof=0), None when nothing is left."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": None, "std": None}
    return {"mean": float(v.mean()), "std": float(v.std())}


# -- inputs ---------------------------------------------------------------------------------------

@dataclass
class Sources:
    index: object
    store: object
    sae: torch.nn.Module
    probe: object
    backbone: object
    layer: int
    train: object  # the probe's training dataset
    test: object
    train_images: np.ndarray
    test_images: np.ndarray
    store_dtype: torch.dtype
    device: str



def _probe_split(probe, which: str, directory) -> tuple[dict, np.ndarray]:
    entry = probe.meta.get(which)
    if not isinstance(entry, dict) or not isinstance(entry.get("spec"), dict) or entry.get("images") is None:
        raise VisaeError(f"probe {directory} does not record its {which} images (probe.json {which}.spec, "
                         f"{which}.images): rerun `visae probe`")
    return entry["spec"], np.asarray(entry["images"], dtype=np.int64)


def open_sources(index_dir, probe_dir, model_spec: dict, weights, layer, task: str, device: str) -> Sources:
    """The latent index, its store and SAE, the probe, the model and the probe's datasets, checked
    to belong together; every refusal is one line."""
    from visae.analysis.invariance import check_same_model
    from visae.analysis.latent_index import LatentIndex, reopen_sources
    from visae.analysis.probes import LinearProbe
    from visae.data import open_dataset
    from visae.models import load_backbone
    from visae.store.format import STORE_DTYPES
    from visae.store.meta import model_identity

    index = LatentIndex.load(index_dir)
    store, sae = reopen_sources(index)
    probe = LinearProbe.load(probe_dir)
    if probe.task != task:
        raise VisaeError(f"probe {probe_dir} is a {probe.task} probe, not --task {task}")
    spec = dict(model_spec)
    if weights is not None:
        spec["weights"] = str(weights)
    if spec.get("source") == "pretrain" and not spec.get("weights"):
        raise VisaeError("the model is a `visae pretrain` model: pass its weights file (--weights)")
    backbone = load_backbone(spec)
    check_same_model(backbone, store.info.model, store.root)
    probe_model = (probe.meta.get("model") or {}).get("identity")
    if probe_model != backbone.identity:
        differ = sorted(k for k in set(probe_model or {}) | set(backbone.identity)
                        if (probe_model or {}).get(k) != backbone.identity.get(k))
        raise VisaeError(f"probe {probe_dir} was trained on another model than --model "
                         f"(they differ in {', '.join(differ) or 'everything'}): train the probe on this model")
    resolved = backbone.resolve_layer(layer)
    source = sae.config.get("source") or {}
    if model_identity(source.get("model")) != backbone.identity:
        raise VisaeError(f"SAE {index.meta['sae_path']} was trained on another model than --model: "
                         f"use an SAE of this model")
    if source.get("layer") != resolved or store.info.layer != resolved:
        raise VisaeError(f"SAE {index.meta['sae_path']} was trained on block {source.get('layer')} "
                         f"(store {store.info.layer}), not --layer {layer} (block {resolved}): use the SAE of that layer")
    if probe.d_model != backbone.d_model:
        raise VisaeError(f"probe {probe_dir} reads {probe.d_model}-d features, the model has {backbone.d_model}")
    if tuple(index.meta.get("grid") or backbone.layout.grid) != tuple(backbone.layout.grid):
        raise VisaeError(f"the latent index's patch grid {index.meta.get('grid')} is not the model's "
                         f"{list(backbone.layout.grid)}")
    train_spec, train_images = _probe_split(probe, "train", probe_dir)
    test_spec, test_images = _probe_split(probe, "test", probe_dir)
    train, test = open_dataset(train_spec), open_dataset(test_spec)
    for name, ds, images in (("train", train, train_images), ("test", test, test_images)):
        if not len(images) or images.min() < 0 or images.max() >= len(ds):
            raise VisaeError(f"probe {probe_dir}'s {name} images do not fit dataset {ds.name} ({len(ds)} images): "
                             f"point its root at the data the probe was trained on")
        if task == "segmentation" and not ds.has_masks:
            raise VisaeError(f"dataset {ds.name} has no masks: segmentation needs a dataset with masks")
    backbone.to(device)
    sae.to(device)
    return Sources(index, store, sae, probe, backbone, resolved, train, test, train_images, test_images,
                   STORE_DTYPES[store.info.dtype][1], device)


# -- the forward passes ---------------------------------------------------------------------------

class EditedForward:
    """The final tokens of one batch, plain and under edits at block `layer`.

    `start(pixels)` runs the blocks up to `layer` once (the residual stream, kept) and the rest
    (the plain tokens); `edited(edit, rows)` runs the edit on the kept stream of `rows` and the
    blocks after `layer`. The first batch checks that shortcut's plain pass against
    `final_tokens(pixels)`; if they differ, every edit goes through `final_tokens(pixels, edit=...,
    layer=...)` instead."""

    def __init__(self, backbone, layer: int):
        self.backbone, self.layer = backbone, layer
        self.blocks_alone: bool | None = None  # None until the first batch decided it
        self.pixels = self.resid = self.plain = None

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.tokens_after(x, self.layer)

    def start(self, pixels: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        self.pixels = pixels.to(bb.device)
        self.resid = bb.record(self.pixels, [self.layer])[self.layer]
        if self.blocks_alone is None:
            reference = bb.final_tokens(self.pixels)
            try:
                alone = self._tail(self.resid)
                scale = float(reference.abs().max()) or 1.0
                self.blocks_alone = alone.shape == reference.shape and bool(
                    (alone - reference).abs().max() <= TAIL_RTOL * scale)
            except torch.OutOfMemoryError:
                raise
            except (TypeError, RuntimeError, ValueError):  # a block that needs more than its input
                self.blocks_alone = False
        self.plain = self._tail(self.resid) if self.blocks_alone else self.backbone.final_tokens(self.pixels)
        return self.plain

    def edited(self, edit, rows=None) -> torch.Tensor:
        """Final tokens of the batch's `rows` (all by default) with `edit` at block `layer`."""
        return next(self.many([(edit, rows)]))

    def many(self, jobs: list):
        """Final tokens for each (edit, rows) of `jobs`, in order (a generator): the edited streams
        of consecutive jobs go through the blocks after `layer` together, about TAIL_ROWS images at
        a time, so memory stays bounded by one such group."""
        if not self.blocks_alone:
            for edit, rows in jobs:
                yield self.backbone.final_tokens(self.pixels if rows is None else self.pixels[rows], edit=edit,
                                                 layer=self.layer)
            return
        group, n_rows = [], 0
        for i, (edit, rows) in enumerate(jobs):
            with torch.inference_mode():
                group.append(edit(self.resid if rows is None else self.resid[rows]))
            n_rows += len(group[-1])
            if n_rows >= TAIL_ROWS or i == len(jobs) - 1:
                with torch.inference_mode():
                    out = self._tail(torch.cat(group))
                yield from out.split([len(x) for x in group])
                group, n_rows = [], 0


def _pooled(src: Sources) -> tuple[slice, str]:
    """The tokens an image-level activation is the maximum over: as the latent index pools them."""
    lay = src.backbone.layout
    kind = src.index.meta.get("pooled_tokens", "patches")
    return (slice(lay.n_prefix, lay.n_tokens), kind) if kind == "patches" else (slice(0, 1), kind)


def _sae_codes(src: Sources, resid: torch.Tensor, latents=None, *, as_stored: bool = True) -> torch.Tensor:
    """SAE codes of residual tokens [b, t, d], rounded to the store's dtype first (as extraction
    stored them) unless not `as_stored` (what an edit sees): all latents [b, t, h], or `latents`
    only; chunked to bound memory."""
    x = (resid.to(src.store_dtype) if as_stored else resid).to(src.sae.W_enc.dtype)
    width = src.sae.width if latents is None else len(latents)
    rows = max(1, ENCODE_CHUNK_FLOATS // max(1, x.shape[1] * width))
    with torch.inference_mode():
        parts = [src.sae.encode(x[i:i + rows]) if latents is None else src.sae.encode_some(x[i:i + rows], latents)
                 for i in range(0, len(x), rows)]
    return torch.cat(parts) if parts else x.new_zeros(0, x.shape[1], width)


# -- choosing latents on the training images -------------------------------------------------------

def classification_choice(src: Sources, batch_size: int) -> dict:
    """Per class its most selective alive latent (see the module docstring)."""
    C, h = len(src.probe.classes), src.sae.width
    fires = np.zeros((h, C), dtype=np.float64)
    n_class = np.zeros(C, dtype=np.float64)
    tokens, _ = _pooled(src)
    for pixels, labels, _ in task_batches(src.train, src.train_images, src.backbone, batch_size,
                                          desc="choose latents"):
        resid = src.backbone.record(pixels.to(src.backbone.device), [src.layer])[src.layer][:, tokens]
        on = (_sae_codes(src, resid).amax(dim=1) > 0).double().cpu()
        keep = (labels >= 0) & (labels < C)
        onehot = F.one_hot(labels[keep], C).double()
        fires += (on[keep].T @ onehot).numpy()
        n_class += onehot.sum(0).numpy()
    if (n_class == 0).any():
        missing = [src.probe.classes[c] for c in np.flatnonzero(n_class == 0)]
        raise VisaeError(f"the probe's training images hold no image of class {', '.join(missing)}: "
                         f"the latents are chosen per class on them")
    fire_rate = fires / n_class[None, :]
    sel = selectivity(fire_rate)
    eligible = src.index.alive & (fires.sum(1) > 0)
    if not eligible.any():
        raise VisaeError("no latent of the SAE fires on the probe's training images: nothing to intervene on")
    masked = np.where(eligible[:, None], sel, -np.inf)
    latents = masked.argmax(axis=0)
    return {"latents": [int(j) for j in latents], "score": [float(masked[j, c]) for c, j in enumerate(latents)],
            "fire_rate": [float(fire_rate[j, c]) for c, j in enumerate(latents)], "eligible": eligible,
            "frequency": fires.sum(1) / n_class.sum()}


def segmentation_choice(src: Sources, thresholds: list[float], max_frequency: float, batch_size: int) -> dict:
    """Per class the best-F1 (latent, threshold) among frequency-masked alive latents."""
    from visae.data.patches import patch_labels

    C, h, T = len(src.probe.classes), src.sae.width, len(thresholds)
    lay = src.backbone.layout
    tp = np.zeros((T, h, C), dtype=np.float64)
    n_pred = np.zeros((T, h), dtype=np.float64)
    n_true = np.zeros(C, dtype=np.float64)
    fired = np.zeros(h, dtype=np.float64)
    n_patches = 0
    thr = torch.tensor(thresholds, dtype=torch.float32)
    for pixels, _, masks in task_batches(src.train, src.train_images, src.backbone, batch_size,
                                         desc="choose latents"):
        resid = src.backbone.record(pixels.to(src.backbone.device), [src.layer])[src.layer][:, lay.n_prefix:]
        f = _sae_codes(src, resid).reshape(-1, h).float().cpu()
        labels = torch.from_numpy(np.concatenate([
            patch_labels(m.numpy(), lay.grid, src.train.ignore_index, src.train.patch_vote) for m in masks
        ]).astype(np.int64))
        fired += (f > 0).sum(0).double().numpy()
        n_patches += len(f)
        keep = (labels >= 0) & (labels < C)
        if src.train.ignore_index is not None:
            keep &= labels != src.train.ignore_index
        f, onehot = f[keep], F.one_hot(labels[keep], C).float()
        n_true += onehot.sum(0).double().numpy()
        for t in range(T):
            on = (f > thr[t]).float()
            tp[t] += (on.T @ onehot).double().numpy()
            n_pred[t] += on.sum(0).double().numpy()
    frequency = fired / max(n_patches, 1)
    eligible = src.index.alive & (frequency > 0) & (frequency <= max_frequency)
    if not eligible.any():
        raise VisaeError(f"no alive latent fires on at most {max_frequency} of the training patches: "
                         f"raise --max-frequency")
    latents, thr_index, f1 = best_f1(tp, n_pred, n_true, eligible)
    return {"latents": [int(j) for j in latents], "threshold": [float(thresholds[t]) for t in thr_index],
            "f1": [float(v) for v in f1], "score": [float(v) for v in f1], "eligible": eligible,
            "frequency": frequency}


# -- the edits on the test images ------------------------------------------------------------------

@dataclass
class Plan:
    """What is edited: per class the chosen latent, its baselines and (classification) insertion targets."""

    latents: list[int]
    random_latents: list[int]
    directions: torch.Tensor  # [C, d] random unit directions
    max_activation: np.ndarray
    manual: dict[int, int] = field(default_factory=dict)  # class -> latent (segmentation)
    insert_targets: list[list[int]] = field(default_factory=list)


class BatchCodes:
    """The SAE codes, on one batch's residual stream, of every latent an edit of the run touches:
    computed once per batch and handed to each LatentEdit (`current`)."""

    def __init__(self, src: Sources, plan: Plan, resid: torch.Tensor):
        self.columns = sorted({*plan.latents, *plan.random_latents, *plan.manual.values()})
        self.at = {j: i for i, j in enumerate(self.columns)}
        self.codes = _sae_codes(src, resid, self.columns, as_stored=False)  # [b, T, J]

    def of(self, latent: int, rows) -> torch.Tensor:
        codes = self.codes[:, :, self.at[latent]:self.at[latent] + 1]
        return codes if rows is None else codes[rows]


def _edits(src: Sources, plan: Plan, cls: int, scale: float, tokens: torch.Tensor, codes: BatchCodes,
           rows=None) -> dict:
    """The method -> edit of class `cls`'s latent (and its baselines) set to scale x max, for the
    batch's `rows` (all by default)."""
    def set_latent(j):
        return LatentEdit(src.sae, [j], [float(scale * plan.max_activation[j])], tokens, current=codes.of(j, rows))

    latent = set_latent(plan.latents[cls])
    edits = {"latent": latent, "random_latent": set_latent(plan.random_latents[cls]),
             "random_direction": DirectionEdit(plan.directions[cls], latent.delta_norm, tokens)}
    if cls in plan.manual:
        edits["manual"] = set_latent(plan.manual[cls])
    return edits


def _probe_move(probe, feats0: torch.Tensor, feats_latent: torch.Tensor, cls: int) -> torch.Tensor:
    """The features moved as far as the latent edit moved them, along the probe's direction for
    `cls` (its logit's gradient w_c / std), with the sign of the latent edit's effect on that logit."""
    direction = (probe.weight[cls] / probe.std).to(feats0.device, torch.float32)
    direction = direction / direction.norm().clamp_min(1e-12)
    distance = (feats_latent.float() - feats0.float()).norm(dim=-1, keepdim=True)
    logit_change = probe.logits(feats_latent)[:, cls] - probe.logits(feats0)[:, cls]
    return feats0.float() + torch.sign(logit_change).unsqueeze(-1) * distance * direction


def _probs(probe, feats: torch.Tensor) -> torch.Tensor:
    return torch.softmax(probe.logits(feats), dim=-1).cpu()


@dataclass
class ClassificationRun:
    labels: np.ndarray  # [N]
    probs0: np.ndarray  # [N, C]
    pred0: np.ndarray  # [N]
    # (kind, class, method, scale, target) -> (positions, pred after, probability of the class after)
    results: dict
    best: dict  # class -> (latent activation, test position): the figure's image


def run_classification(src: Sources, plan: Plan, *, suppress_scale: float, insert_scale: float, scales: list[float],
                       where: str, batch_size: int) -> ClassificationRun:
    """Per test batch: the plain predictions, then for each class its suppression on every image
    (the class's own and the others'), its dose-response on its own images, and the insertion of
    each target class's latent on its images; every method's edits of a batch run together."""
    probe, bb = src.probe, src.backbone
    C = len(probe.classes)
    fwd = EditedForward(bb, src.layer)
    mask = token_mask(bb.layout, where)
    pooled, _ = _pooled(src)
    has_cls, n_prefix = bb.layout.n_cls > 0, bb.layout.n_prefix
    feats = lambda tokens: probe.features(tokens, n_prefix, has_cls)  # noqa: E731
    parts: dict = {}
    labels_all, probs_all = [], []
    best: dict = {}
    offset = 0
    dose_scales = [s for s in scales if s != suppress_scale]
    for pixels, labels, _ in task_batches(src.test, src.test_images, bb, batch_size, desc="edit"):
        feats0 = feats(fwd.start(pixels))
        probs0 = _probs(probe, feats0)
        labels_all.append(labels.numpy())
        probs_all.append(probs0.numpy())
        codes = BatchCodes(src, plan, fwd.resid)
        acts = _sae_codes(src, fwd.resid[:, pooled], plan.latents).amax(dim=1).cpu()  # [b, C]
        jobs = []  # (kind, class, scale, target class, rows), its method -> edit
        for c in range(C):
            rows = torch.nonzero(labels == c).flatten()
            jobs.append((("suppress", c, suppress_scale, None, None), _edits(src, plan, c, suppress_scale, mask, codes)))
            if not len(rows):
                continue
            k = int(acts[rows, c].argmax())
            if c not in best or float(acts[rows[k], c]) > best[c][0]:
                best[c] = (float(acts[rows[k], c]), offset + int(rows[k]))
            rows = rows.to(bb.device)
            jobs += [(("dose", c, s, None, rows), _edits(src, plan, c, s, mask, codes, rows)) for s in dose_scales]
            jobs += [(("insert", c, insert_scale, t, rows), _edits(src, plan, t, insert_scale, mask, codes, rows))
                     for t in plan.insert_targets[c]]
        flat = [(key, method, edit) for key, edits in jobs for method, edit in edits.items()]
        outputs = fwd.many([(edit, key[4]) for key, _, edit in flat])
        latent_feats = {}
        for (key, method, _), tokens in zip(flat, outputs):
            f = feats(tokens)
            kind, c, scale, target, rows = key
            if method == "latent":
                latent_feats[key] = f
            record = parts.setdefault((kind, c, method, scale, target), ([], [], []))
            _append(record, offset, rows, len(labels), _probs(probe, f), c if target is None else target)
        for key, f in latent_feats.items():
            kind, c, scale, target, rows = key
            cls = c if target is None else target
            moved = _probe_move(probe, feats0 if rows is None else feats0[rows], f, cls)
            _append(parts.setdefault((kind, c, "probe_direction", scale, target), ([], [], [])), offset, rows,
                    len(labels), _probs(probe, moved), cls)
        offset += len(labels)
    results = {k: tuple(np.concatenate(v) for v in lists) for k, lists in parts.items()}
    probs0 = np.concatenate(probs_all)
    return ClassificationRun(np.concatenate(labels_all), probs0, probs0.argmax(-1), results, best)


def _append(record, offset: int, rows, n_batch: int, probs: torch.Tensor, cls: int) -> None:
    """Add one batch's (test positions, predictions, probability of `cls`) to a job's record."""
    positions, preds, probs_cls = record
    positions.append(offset + (np.arange(n_batch) if rows is None else rows.cpu().numpy()))
    preds.append(probs.argmax(-1).numpy())
    probs_cls.append(probs[:, cls].numpy())


def classification_tables(run: ClassificationRun, plan: Plan, classes: list[str], *, suppress_scale: float,
                          insert_scale: float, scales: list[float], seed: int = 0
                          ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(classes.csv, dose.csv, intervention.json's task part) from the run's predictions."""
    C = len(classes)
    rows = []
    for c in range(C):
        own = run.labels == c
        for method in CLASSIFICATION_METHODS:
            pos, pred, prob = run.results[("suppress", c, method, suppress_scale, None)]
            at_own, at_other = own[pos], ~own[pos]
            p_before = float(run.probs0[pos[at_own], c].mean()) if at_own.any() else math.nan
            p_after = float(prob[at_own].mean()) if at_own.any() else math.nan
            acc_before, acc_after = accuracy(run.pred0[pos[at_own]], c), accuracy(pred[at_own], c)
            other_before = accuracy(run.pred0[pos[at_other]], run.labels[pos[at_other]])
            other_after = accuracy(pred[at_other], run.labels[pos[at_other]])
            flips = [flip_rate(run.pred0[p], pr, t) for t in plan.insert_targets[c]
                     for p, pr, _ in [run.results.get(("insert", c, method, insert_scale, t), (None,) * 3)]
                     if p is not None]
            latent = {"latent": plan.latents[c], "random_latent": plan.random_latents[c]}.get(method)
            rows.append({"class": c, "class_name": classes[c], "method": method, "latent": latent,
                         "n_images": int(own.sum()), "p_before": p_before, "p_after": p_after,
                         "delta_prob": p_after - p_before, "acc_before": acc_before, "acc_after": acc_after,
                         "delta_acc": acc_after - acc_before, "other_acc_before": other_before,
                         "other_acc_after": other_after, "other_delta_acc": other_after - other_before,
                         "flip_rate": float(np.mean(flips)) if flips else math.nan})
    table = pd.DataFrame(rows, columns=CLASSIFICATION_COLUMNS).astype({"latent": "Int64"})
    dose = []
    for method in CLASSIFICATION_METHODS:
        for s in scales:
            d_prob, d_acc = [], []
            for c in range(C):
                kind = "suppress" if s == suppress_scale else "dose"
                pos, pred, prob = run.results.get((kind, c, method, s, None), (None,) * 3)
                if pos is None:
                    continue
                at = run.labels[pos] == c
                if not at.any():
                    continue
                d_prob.append(float(prob[at].mean() - run.probs0[pos[at], c].mean()))
                d_acc.append(accuracy(pred[at], c) - accuracy(run.pred0[pos[at]], c))
            m_prob, m_acc = mean_std(d_prob), mean_std(d_acc)
            dose.append({"method": method, "scale": s, "delta_prob_mean": m_prob["mean"],
                         "delta_prob_std": m_prob["std"], "delta_acc_mean": m_acc["mean"],
                         "delta_acc_std": m_acc["std"]})
    by = {m: table[table.method == m] for m in CLASSIFICATION_METHODS}
    part = {
        "suppression": {m: {k: mean_std(by[m][k]) for k in ("delta_prob", "delta_acc", "other_delta_acc")}
                        for m in CLASSIFICATION_METHODS},
        "insertion": {m: {"flip_rate": mean_std(by[m]["flip_rate"])} for m in CLASSIFICATION_METHODS},
        "accuracy_before": accuracy(run.pred0, run.labels),
    }
    effects = {m: by[m]["delta_prob"].to_numpy(dtype=np.float64) for m in CLASSIFICATION_METHODS}
    part["finding"] = finding("classification", effects, seed, plan.latents)
    return table, pd.DataFrame(dose), part


@dataclass
class SegmentationRun:
    counts: dict  # (class, method, scale) -> [target changed, target total, other changed, other total]
    confusion: dict  # (class, method) -> [C, C] at the headline scale; (None, "before") unedited
    best: dict  # class -> (patches labelled the class, test position): the figure's image


def run_segmentation(src: Sources, plan: Plan, *, scale: float, scales: list[float], batch_size: int) -> SegmentationRun:
    from visae.data.patches import patch_labels

    probe, bb = src.probe, src.backbone
    C, lay = len(probe.classes), bb.layout
    fwd = EditedForward(bb, src.layer)
    mask = token_mask(lay, "patches")
    counts: dict = {}
    cms: dict = {(None, "before"): np.zeros((C, C), dtype=np.int64)}
    best: dict = {}
    offset = 0
    all_scales = list(dict.fromkeys([*scales, scale]))
    for pixels, _, masks in task_batches(src.test, src.test_images, bb, batch_size, desc="edit"):
        logits0 = probe.logits(probe.features(fwd.start(pixels), lay.n_prefix, lay.n_cls > 0))
        pred0 = logits0.argmax(-1).cpu().numpy()
        target = masks.numpy()
        cms[(None, "before")] += confusion_matrix(pixel_predictions(probe, logits0, lay.grid, bb.image_size), target,
                                           C, probe.ignore_index)
        labels = np.stack([patch_labels(m, lay.grid, src.test.ignore_index, src.test.patch_vote) for m in target])
        codes = BatchCodes(src, plan, fwd.resid)
        flat = []
        for c in range(C):
            if c == probe.ignore_index:  # e.g. ADE20K's "other": never a target
                continue
            n_c = (labels == c).sum(1)
            k = int(n_c.argmax())
            if n_c[k] > 0 and (c not in best or int(n_c[k]) > best[c][0]):
                best[c] = (int(n_c[k]), offset + k)
            flat += [((c, method, s), edit) for s in all_scales
                     for method, edit in _edits(src, plan, c, s, mask, codes).items()]
        outputs = fwd.many([(edit, None) for _, edit in flat])
        for ((c, method, s), _), tokens in zip(flat, outputs):
            logits = probe.logits(probe.features(tokens, lay.n_prefix, lay.n_cls > 0))
            pred = logits.argmax(-1).cpu().numpy()
            counts.setdefault((c, method, s), np.zeros(4, dtype=np.int64))[:] += change_counts(pred0, pred, c)
            if s == scale:
                cm = cms.setdefault((c, method), np.zeros((C, C), dtype=np.int64))
                cm += confusion_matrix(pixel_predictions(probe, logits, lay.grid, bb.image_size), target, C,
                                       probe.ignore_index)
        offset += len(target)
    return SegmentationRun(counts, cms, best)


def segmentation_tables(run: SegmentationRun, plan: Plan, choice: dict, classes: list[str], *, scale: float,
                        scales: list[float], probe_ignore: int | None, seed: int = 0
                        ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    C = len(classes)
    methods = [m for m in SEGMENTATION_METHODS if m != "manual" or plan.manual]
    rows = []
    for c in range(C):
        if c == probe_ignore:
            continue
        for method in methods:
            if method == "manual" and c not in plan.manual:
                continue
            t_changed, t_total, o_changed, o_total = run.counts[(c, method, scale)]
            latent = {"latent": plan.latents[c], "random_latent": plan.random_latents[c],
                      "manual": plan.manual.get(c)}.get(method)
            chosen = method == "latent"
            rows.append({"class": c, "class_name": classes[c], "method": method, "latent": latent,
                         "f1": choice["f1"][c] if chosen else math.nan,
                         "threshold": choice["threshold"][c] if chosen else math.nan,
                         "n_target_patches": int(t_total), "target_change": rate(t_changed, t_total),
                         "other_change": rate(o_changed, o_total),
                         "miou_after": iou_from_confusion(run.confusion[(c, method)], probe_ignore)[0]})
    table = pd.DataFrame(rows, columns=SEGMENTATION_COLUMNS).astype({"latent": "Int64"})
    dose = []
    for method in methods:
        for s in scales:
            tc, oc = [], []
            for c in range(C):
                if (c, method, s) in run.counts:
                    t_changed, t_total, o_changed, o_total = run.counts[(c, method, s)]
                    tc.append(rate(t_changed, t_total))
                    oc.append(rate(o_changed, o_total))
            mt, mo = mean_std(tc), mean_std(oc)
            dose.append({"method": method, "scale": s, "target_change_mean": mt["mean"], "target_change_std": mt["std"],
                         "other_change_mean": mo["mean"], "other_change_std": mo["std"]})
    by = {m: table[table.method == m] for m in methods}
    part = {"rates": {m: {k: mean_std(by[m][k]) for k in ("target_change", "other_change", "miou_after")}
                      for m in methods},
            "miou_before": iou_from_confusion(run.confusion[(None, "before")], probe_ignore)[0],
            "mode": "auto+manual" if plan.manual else "auto"}
    effects = {m: (by[m]["target_change"] - by[m]["other_change"]).to_numpy(dtype=np.float64) for m in methods}
    part["finding"] = finding("segmentation", effects, seed,
                              [plan.latents[c] for c in range(len(classes)) if c != probe_ignore])
    return table, pd.DataFrame(dose), part


FINDING_RESAMPLES = 2000  # bootstrap resamples of the per-class margins


def finding(task: str, effects: dict, seed: int, latents=None) -> dict:
    """Whether the chosen latent moves its target more than both random baselines, in one sentence.

    `effects`: per method, the per-class headline (classification: the change of the class's
    probability, compared by size; segmentation: target minus other change rate). The margins over
    each baseline are paired per class, with a seeded 95% bootstrap interval: the latent "moves
    more" only when both intervals lie above zero, so a difference within the classes' spread is not
    called a win. `latents`: the chosen latent per class; classes sharing one latent are not
    independent, so the sentence says how many distinct latents the classes used.
    """
    size = np.abs if task == "classification" else (lambda v: v)
    ours = np.asarray(effects["latent"], dtype=np.float64)
    margins = {}
    for base in ("random_latent", "random_direction"):
        theirs = np.asarray(effects[base], dtype=np.float64)
        keep = np.isfinite(ours) & np.isfinite(theirs)
        margins[base] = bootstrap_mean(size(ours[keep]) - size(theirs[keep]), np.random.default_rng(seed),
                                       FINDING_RESAMPLES)
    moves = all(m["n"] >= 2 and m["low"] > 0 for m in margins.values())
    distinct = len(set(int(j) for j in latents)) if latents is not None else None
    fmt = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:+.3g}"  # noqa: E731
    mean = {m: fmt(float(np.nanmean(effects[m])) if np.isfinite(effects[m]).any() else math.nan)
            for m in ("latent", "random_latent", "random_direction")}
    what = ("Suppressing each class's most selective latent changes the class's probability by {latent} on average "
            if task == "classification" else
            "Setting each class's best-F1 latent changes the class's patches by {latent} more than the other patches "
            "(target minus other change rate) on average ").format(**mean)
    interval = lambda m: f"{fmt(m['value'])} [{fmt(m['low'])}, {fmt(m['high'])}]"  # noqa: E731
    text = (what + f"(a random latent of matched frequency: {mean['random_latent']}; a random direction of the "
            f"same norm: {mean['random_direction']}); per class, the latent's {'size of ' if task == 'classification' else ''}"
            f"effect exceeds the random latent's by {interval(margins['random_latent'])} and the random direction's "
            f"by {interval(margins['random_direction'])} (95% bootstrap over {len(ours)} classes"
            + (f", {distinct} distinct latents" if distinct is not None else "") + "): the chosen latent "
            + ("moves its target more than both baselines." if moves else
               "does not clearly move its target more than both baselines."))
    return {"moves_more_than_baselines": moves, "text": text, "margins": margins, "distinct_latents": distinct}


# -- the figure's examples --------------------------------------------------------------------------

def _display(backbone, pixels: torch.Tensor) -> np.ndarray:
    """Model-input pixels [n, 3, H, W] back to uint8 [n, H, W, 3] (the transform's Normalize undone)."""
    x = pixels.detach().float().cpu()
    for step in getattr(backbone.transform, "transforms", [backbone.transform]):
        if type(step).__name__ == "Normalize":
            mean = torch.as_tensor(step.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
            std = torch.as_tensor(step.std, dtype=torch.float32).reshape(1, -1, 1, 1)
            x = x * std + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def examples(src: Sources, plan: Plan, choice: dict, best: dict, n: int, *, task: str, scale: float,
             where: str = "patches") -> dict:
    """The figure's tensors for the `n` classes of best selection score that have a test image."""
    lay, C = src.backbone.layout, len(src.probe.classes)
    order = sorted((c for c in range(C) if c in best), key=lambda c: (-np.nan_to_num(choice["score"][c], nan=-1), c))
    picked = order[:n]
    gh, gw = lay.grid
    H, W = src.backbone.image_size
    out = {"image": np.zeros((0, H, W, 3), np.uint8), "heatmap": np.zeros((0, gh, gw), np.float32),
           "class": np.array(picked, dtype=np.int64), "latent": np.array([plan.latents[c] for c in picked], np.int64)}
    if task == "classification":
        out |= {"probs_before": np.zeros((0, C), np.float32), "probs_after": np.zeros((0, C), np.float32)}
    else:
        out |= {"pred_before": np.zeros((0, H, W), np.int64), "pred_after": np.zeros((0, H, W), np.int64)}
    if not picked:
        return out
    images = src.test_images[[best[c][1] for c in picked]]
    pixels, _, _ = next(task_batches(src.test, images, src.backbone, len(images), desc=None))
    fwd = EditedForward(src.backbone, src.layer)
    plain = fwd.start(pixels)
    codes = _sae_codes(src, fwd.resid[:, lay.n_prefix:], plan.latents).cpu()  # [n, P, C]
    out["image"] = _display(src.backbone, pixels)
    out["heatmap"] = np.stack([codes[i, :, c].reshape(gh, gw).numpy() for i, c in enumerate(picked)]).astype(np.float32)
    after = []
    for i, c in enumerate(picked):
        mask = token_mask(lay, where)
        edit = LatentEdit(src.sae, [plan.latents[c]], [float(scale * plan.max_activation[plan.latents[c]])], mask)
        after.append(fwd.edited(edit, torch.tensor([i], device=src.backbone.device)))
    after = torch.cat(after)
    feats = lambda tokens: src.probe.features(tokens, lay.n_prefix, lay.n_cls > 0)  # noqa: E731
    if task == "classification":
        out["probs_before"] = _probs(src.probe, feats(plain)).numpy().astype(np.float32)
        out["probs_after"] = _probs(src.probe, feats(after)).numpy().astype(np.float32)
    else:
        grid, size = lay.grid, src.backbone.image_size
        out["pred_before"] = pixel_predictions(src.probe, src.probe.logits(feats(plain)), grid, size).cpu().numpy()
        out["pred_after"] = pixel_predictions(src.probe, src.probe.logits(feats(after)), grid, size).cpu().numpy()
    return out


# -- the command --------------------------------------------------------------------------------------

def _finite(values, flag: str) -> list[float]:
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise VisaeError(f"{flag} must be finite numbers, got {bad[0]}")
    return [float(v) for v in values]


def _manual_latents(text: str | None, classes: list[str], width: int) -> dict[int, int]:
    if not text:
        return {}
    given = json_object(text, "--latents-json")
    out = {}
    for name, latent in given.items():
        if name not in classes:
            raise VisaeError(f"--latents-json names class {name!r}, which the probe does not have "
                             f"(classes: {', '.join(classes)})")
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < width:
            raise VisaeError(f"--latents-json gives latent {latent!r} for {name!r}, out of range for an SAE of "
                             f"{width} latents (0..{width - 1})")
        out[classes.index(name)] = latent
    return out


def _nan_to_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def intervene(args) -> tuple[dict, pd.DataFrame, pd.DataFrame, dict, list[str]]:
    """(intervention.json without config and provenance, classes.csv, dose.csv, the examples, the
    class names) for parsed arguments."""
    scales = _finite(args.scales, "--scales")
    task = args.task
    src = open_sources(args.index, args.probe, json_object(args.model, "--model"), args.weights, args.layer, task,
                       args.device)
    classes, C = list(src.probe.classes), len(src.probe.classes)
    manual = _manual_latents(args.latents_json, classes, src.sae.width) if task == "segmentation" else {}
    if task == "classification":
        suppress, insert = _finite([args.suppress_scale, args.insert_scale], "--suppress-scale/--insert-scale")
        choice = classification_choice(src, args.batch_size)
    else:
        (scale,) = _finite([args.scale], "--scale")
        thresholds = _finite(args.thresholds, "--thresholds")
        if not 0 < args.max_frequency <= 1:
            raise VisaeError(f"--max-frequency must be in (0, 1], got {args.max_frequency}")
        choice = segmentation_choice(src, thresholds, args.max_frequency, args.batch_size)
    index = src.index
    rng_latents, rng_targets = np.random.default_rng([args.seed, 0]), np.random.default_rng([args.seed, 1])
    directions = torch.randn(C, src.sae.d_model, generator=torch.Generator().manual_seed(args.seed))
    plan = Plan(latents=choice["latents"],
                # from the pool the chosen latents were chosen from, matched on the same training images
                random_latents=matched_random_latents(choice["latents"], choice["frequency"], choice["eligible"],
                                                      rng_latents, exclude=manual.values()),
                directions=directions / directions.norm(dim=1, keepdim=True),
                max_activation=index.max_activation, manual=manual)
    common = {"task": task, "identity": index.identity.to_dict(), "model": index.identity.model,
              "dataset": src.test.name, "layer": index.identity.layer, "sae": index.identity.sae,
              "sae_sha256": index.meta.get("sae_sha256"), "index": str(args.index),
              "probe": {"dir": str(args.probe), "metric": src.probe.meta.get("metric"),
                        "test_score": src.probe.meta.get("test_score"),
                        "random_init_score": (src.probe.meta.get("random_init") or {}).get("test_score")},
              "n_classes": C, "n_images": int(len(src.test_images)), "scales": scales}
    if task == "classification":
        k = min(args.insert_targets, C - 1)
        plan.insert_targets = [sorted(int(t) for t in rng_targets.choice([o for o in range(C) if o != c], k,
                                                                          replace=False)) for c in range(C)]
        run = run_classification(src, plan, suppress_scale=suppress, insert_scale=insert, scales=scales,
                                 where=args.tokens, batch_size=args.batch_size)
        table, dose, part = classification_tables(run, plan, classes, suppress_scale=suppress, insert_scale=insert,
                                                  scales=scales, seed=args.seed)
        result = {**common, "methods": list(CLASSIFICATION_METHODS), "suppress_scale": suppress,
                  "insert_scale": insert, "tokens": args.tokens, **part}
        figure = examples(src, plan, choice, run.best, args.examples, task=task, scale=suppress, where=args.tokens)
    else:
        run = run_segmentation(src, plan, scale=scale, scales=scales, batch_size=args.batch_size)
        table, dose, part = segmentation_tables(run, plan, choice, classes, scale=scale, scales=scales,
                                                probe_ignore=src.probe.ignore_index, seed=args.seed)
        result = {**common, "methods": [m for m in SEGMENTATION_METHODS if m != "manual" or manual], "scale": scale,
                  "thresholds": thresholds, **part}
        figure = examples(src, plan, choice, run.best, args.examples, task=task, scale=scale)
    return _nan_to_none(result), table, dose, figure, classes


def _safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """A safetensors file with its JSON header's keys sorted: safetensors writes the metadata in
    hash order, which differs between runs, and the same inputs must give the same bytes."""
    from safetensors.numpy import save

    raw = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def write_intervention(out, result: dict, table: pd.DataFrame, dose: pd.DataFrame, figure: dict, config: dict,
                       started: float, classes: list[str]) -> None:
    """classes.csv, dose.csv, examples.safetensors, then intervention.json (the marker) last."""
    from visae.provenance import provenance

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INTERVENTION).unlink(missing_ok=True)
    for name, frame in ((INTERVENTION_CLASSES, table), (INTERVENTION_DOSE, dose)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out / INTERVENTION_EXAMPLES) as tmp:
        tmp.write_bytes(_safetensors_bytes(figure, {"classes": json.dumps(classes), "task": result["task"]}))
    result = {**result, "config": config, "provenance": provenance(config, seeds={"intervene": config["seed"]},
                                                                      started=started)}
    write_json(out / INTERVENTION, result)


def cmd_intervene(args) -> int:
    started = time.time()
    out = Path(args.out)
    (out / INTERVENTION).unlink(missing_ok=True)  # a failed rerun must not leave the old marker standing
    if out.is_dir():
        clean_stale_temps(out)
    result, table, dose, figure, classes = intervene(args)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    config["model"] = json_object(args.model, "--model")
    write_intervention(args.out, result, table, dose, figure, config, started, classes)
    print(f"{result['identity']['sae']} {result['task']}: {result['finding']['text']} "
          f"({time.time() - started:.1f}s) -> {args.out}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("intervene", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--index", required=True, help="the SAE's latent index folder (`visae latents`)")
    p.add_argument("--probe", required=True, help="the task probe's folder (`visae probe`)")
    p.add_argument("--model", required=True, help="the model's config entry as JSON")
    p.add_argument("--weights", default=None, help="the model's weights file (a `visae pretrain` model's)")
    p.add_argument("--layer", required=True, type=int, help="the block edited (the SAE's layer, as the config gives it)")
    p.add_argument("--out", required=True)
    p.add_argument("--scales", type=float, nargs="+", default=[-2, -1, -0.5, 0, 0.5, 1, 2],
                   help="dose-response: the latent set to scale x its maximum activation")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--examples", type=positive_int, default=4, help="images in the figure's examples")
    g = p.add_argument_group("classification")
    g.add_argument("--tokens", choices=list(WHERE), default="patches", help="the tokens edited")
    g.add_argument("--suppress-scale", type=float, default=0.0)
    g.add_argument("--insert-scale", type=float, default=1.0)
    g.add_argument("--insert-targets", type=positive_int, default=5, help="other classes inserted per class")
    g = p.add_argument_group("segmentation")
    g.add_argument("--scale", type=float, default=-2.0)
    g.add_argument("--thresholds", type=float, nargs="+", default=[0, 0.1, 0.3, 1.0])
    g.add_argument("--max-frequency", type=float, default=0.1,
                   help="only latents firing on at most this fraction of the training patches")
    g.add_argument("--latents-json", default=None, help='manual latents per class name, e.g. {"Bag": 17}')
    p.set_defaults(func=cmd_intervene)

"""Probes of a representation: a weighted kNN and linear probes on its features.

They score how much class information features carry: the demo's pretraining reports the kNN
and linear probe for its ViTs, and `visae probe` trains the task heads the interventions edit
against (classification on the final CLS token, segmentation on the final patch tokens, each
next to the same recipe on a random-init twin of the model). All are deterministic: the kNN has
no randomness, the probes train full batch from explicit seeds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visae.args import json_object
from visae.data.patches import patch_labels
from visae.errors import VisaeError
from visae.layout import PROBE, PROBE_WEIGHTS, TASKS
from visae.progress import counted, progress


@torch.no_grad()
def features(model, pixels, u8: torch.Tensor, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A timm ViT's final CLS features (after the last norm) and, if it has a class head, its
    logits; `pixels` turns a uint8 batch into model input (`visae.pretrain.Pixels`)."""
    was_training = model.training
    model.eval()
    feats, logits = [], []
    has_head = getattr(model, "num_classes", 0) > 0
    for i in range(0, len(u8), batch_size):
        x = pixels.batch(u8[i:i + batch_size]).to(device)
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        feats.append(f.float().cpu())
        if has_head:
            logits.append(model.head(f).float().cpu())
    model.train(was_training)
    return torch.cat(feats), (torch.cat(logits) if has_head else None)


def knn_accuracy(train_f, train_y, test_f, test_y, n_classes: int, k: int = 20, t: float = 0.07) -> float:
    """Weighted cosine kNN (as in DINO's evaluation)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), 512):
        sim = test_f[i:i + 512] @ train_f.t()
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), n_classes).scatter_add_(1, train_y[idx], (top / t).exp())
        correct += int((votes.argmax(1) == test_y[i:i + 512]).sum())
    return correct / len(test_f)


def linear_probe_accuracy(train_f, train_y, test_f, test_y, n_classes: int, steps: int = 300, lr: float = 0.05,
                          weight_decay: float = 1e-4) -> float:
    """Softmax regression on standardised features, full batch (deterministic)."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        probe = torch.nn.Linear(xtr.shape[1], n_classes)
        opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            loss = F.cross_entropy(probe(xtr), train_y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((probe(xte).argmax(1) == test_y).float().mean())


def probe_scores(model, pixels, bank_u8, bank_y, test_u8, test_y, batch_size: int, device, knn_k: int,
                 n_classes: int) -> dict[str, float]:
    """A model's kNN and linear-probe accuracy on `test` with `bank` as the labelled set, and its
    own head's accuracy if it has one (rounded to 4 places, as the pretrain config records them)."""
    ftr, _ = features(model, pixels, bank_u8, batch_size, device)
    fte, logits = features(model, pixels, test_u8, batch_size, device)
    out = {
        "knn_acc": round(knn_accuracy(ftr, bank_y, fte, test_y, n_classes, k=knn_k), 4),
        "linear_probe_acc": round(linear_probe_accuracy(ftr, bank_y, fte, test_y, n_classes), 4),
    }
    if logits is not None:
        out["head_acc"] = round(float((logits.argmax(1) == test_y).float().mean()), 4)
    return out


# -- the task probes of the interventions ------------------------------------------------------

def task_features(task: str, tokens: torch.Tensor, n_prefix: int, has_cls: bool) -> torch.Tensor:
    """What a `task` probe reads from final tokens [B, T, d]: the CLS token [B, d] (the patch
    mean for a model without one) for classification, the patch tokens [B, P, d] for segmentation."""
    if task == "segmentation":
        return tokens[:, n_prefix:]
    return tokens[:, 0] if has_cls else tokens[:, n_prefix:].mean(1)


@dataclass
class LinearProbe:
    """A linear task head on a backbone's final-layer tokens (after its final norm).

    classification reads the CLS token (the patch mean for a model without one), segmentation
    every patch token; `logits` standardises with the training features' mean and std, then
    applies the linear map. `meta` is probe.json: what it was trained on and how well it does.
    """

    task: str
    weight: torch.Tensor  # [n_classes, d_model]
    bias: torch.Tensor  # [n_classes]
    mean: torch.Tensor  # [d_model]
    std: torch.Tensor  # [d_model]
    classes: list[str]
    ignore_index: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise VisaeError(f"unknown probe task {self.task!r}: use one of {', '.join(TASKS)}")
        c, d = self.weight.shape
        if self.bias.shape != (c,) or self.mean.shape != (d,) or self.std.shape != (d,) or len(self.classes) != c:
            raise VisaeError(f"inconsistent probe: weight {list(self.weight.shape)}, bias {list(self.bias.shape)}, "
                             f"mean {list(self.mean.shape)}, std {list(self.std.shape)}, {len(self.classes)} classes")

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[1])

    def features(self, tokens: torch.Tensor, n_prefix: int, has_cls: bool) -> torch.Tensor:
        """What this probe reads from final tokens [B, T, d]: [B, d] (classification) or [B, P, d]."""
        return task_features(self.task, tokens, n_prefix, has_cls)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., n_classes], in float32."""
        if feats.shape[-1] != self.d_model:
            raise VisaeError(f"the probe reads {self.d_model}-d features, got {feats.shape[-1]}-d")
        w = self.weight.to(feats.device)
        x = (feats.float() - self.mean.to(feats.device)) / self.std.to(feats.device)
        return x @ w.t() + self.bias.to(feats.device)

    def save(self, directory) -> None:
        """probe.safetensors, then probe.json (the marker) last; both atomic."""
        from safetensors.torch import save_file

        from visae.atomic import atomic_path, write_json

        directory = Path(directory)
        tensors = {k: getattr(self, k).detach().float().cpu().contiguous() for k in ("weight", "bias", "mean", "std")}
        with atomic_path(directory / PROBE_WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
        write_json(directory / PROBE, dict(self.meta, task=self.task, classes=list(self.classes),
                                           ignore_index=self.ignore_index))

    @classmethod
    def load(cls, directory) -> LinearProbe:
        from safetensors.torch import load_file

        directory = Path(directory)
        marker, weights = directory / PROBE, directory / PROBE_WEIGHTS
        if not marker.is_file() or not weights.is_file():
            raise VisaeError(f"{directory} is not a finished probe (no {PROBE} or {PROBE_WEIGHTS}): run `visae probe`")
        try:
            meta = json.loads(marker.read_text())
            t = load_file(str(weights))
            return cls(task=meta["task"], weight=t["weight"], bias=t["bias"], mean=t["mean"], std=t["std"],
                       classes=list(meta["classes"]), ignore_index=meta.get("ignore_index"), meta=meta)
        except VisaeError:
            raise
        except Exception as err:  # truncated or tampered files
            raise VisaeError(f"probe {directory} is unreadable ({type(err).__name__}: {err}): rerun `visae probe`") from None


# -- what the task probes read and how they are scored ----------------------------------------

PIXEL_CHUNK_FLOATS = 1 << 25  # upsampled logits held at once by pixel_predictions (128 MB)


def task_batches(dataset, indices: Sequence[int], backbone, batch_size: int, desc: str | None = "images"
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(pixels [b, 3, H, W] float, labels [b] int64, masks [b, H, W] int64 or None) over the
    images `indices` in that order; masks through `backbone.mask_transform` (model resolution).
    `desc` names the progress bar (None: no bar)."""
    fill = dataset.ignore_index if dataset.ignore_index is not None else 0
    indices = [int(i) for i in indices]
    n = len(indices)
    for start in counted(range(0, n, batch_size), total=n, desc=desc or "", unit="images",
                         size=lambda start: min(batch_size, n - start), enabled=desc is not None):
        samples = [dataset[i] for i in indices[start:start + batch_size]]
        pixels = torch.stack([backbone.transform(s.image) for s in samples]).float()
        labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
        masks = None
        if dataset.has_masks:
            masks = torch.from_numpy(np.stack([backbone.mask_transform(s.mask, fill=fill) for s in samples]))
        yield pixels, labels, masks


def pixel_predictions(probe: LinearProbe, patch_logits: torch.Tensor, grid, image_size) -> torch.Tensor:
    """Patch logits [B, P, C] -> per-pixel classes [B, H, W] int64: bilinear upsampling of the
    logits to the model-input resolution, then argmax (what mIoU scores)."""
    gh, gw = (int(g) for g in grid)
    h, w = (int(s) for s in image_size)
    b, p, c = patch_logits.shape
    if p != gh * gw or c != len(probe.classes):
        raise VisaeError(f"patch logits {list(patch_logits.shape)} do not fit a {gh}x{gw} grid and "
                         f"{len(probe.classes)} classes")
    maps = patch_logits.float().transpose(1, 2).reshape(b, c, gh, gw)
    rows = max(1, PIXEL_CHUNK_FLOATS // (c * h * w))
    out = [F.interpolate(chunk, size=(h, w), mode="bilinear", align_corners=False).argmax(1)
           for chunk in maps.split(rows)]
    return torch.cat(out) if out else torch.zeros((0, h, w), dtype=torch.int64)


def confusion_matrix(pred, target, n_classes: int, ignore_index: int | None) -> np.ndarray:
    """[n_classes, n_classes] int64 counts (rows: target, columns: prediction), pixels whose
    target is `ignore_index` left out."""
    pred = torch.as_tensor(pred).reshape(-1).to(torch.int64)
    target = torch.as_tensor(target).reshape(-1).to(torch.int64)
    if pred.shape != target.shape:
        raise VisaeError(f"{pred.numel()} predicted pixels against {target.numel()} target pixels")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for what, values in (("target", target), ("predicted", pred)):
        if values.numel() and (values.min() < 0 or values.max() >= n_classes):
            raise VisaeError(f"{what} label {int(values.min() if values.min() < 0 else values.max())} is outside "
                             f"0..{n_classes - 1} (ignore_index {ignore_index})")
    counts = torch.bincount(target * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).cpu().numpy().astype(np.int64)


def iou_from_confusion(confusion: np.ndarray, ignore_index: int | None = None) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU): NaN for a class absent from both target and prediction (and for
    the ignore label), which the mean leaves out; NaN mIoU when every class is."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    if ignore_index is not None and 0 <= ignore_index < len(iou):
        iou[ignore_index] = np.nan
    present = ~np.isnan(iou)
    return (float(iou[present].mean()) if present.any() else float("nan")), iou


def mean_iou(pred, target, n_classes: int, ignore_index: int | None) -> tuple[float, np.ndarray]:
    """Pixel-level mIoU of predictions [N, H, W] against targets [N, H, W], the ignore label
    excluded: (mIoU, per-class IoU [n_classes] float64, NaN where a class is in neither)."""
    return iou_from_confusion(confusion_matrix(pred, target, n_classes, ignore_index), ignore_index)


# -- training a task probe (`visae probe`) -----------------------------------------------------

MAX_ROWS_PER_STEP = 1 << 18  # more training rows than this: fixed-order minibatches of this many
RANDOM_INIT_KEYS = ("source", "arch", "name", "image_size", "model_kwargs", "crop_pct", "crop_mode", "interpolation")


@dataclass
class TaskData:
    """A probe's inputs on one image sample: final-layer features ([N, d], or [N, P, d] patch
    tokens), image labels [N], and for segmentation the model-resolution masks [N, H, W] and the
    per-patch labels voted from them [N, P]."""

    feats: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None
    patch_labels: torch.Tensor | None = None

    def subset(self, rows) -> TaskData:
        rows = torch.as_tensor(rows, dtype=torch.int64)
        pick = (lambda t: None if t is None else t[rows])
        return TaskData(self.feats[rows], self.labels[rows], pick(self.masks), pick(self.patch_labels))

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training rows and targets: (features [n, d], labels [n]), one row per image or patch."""
        if self.patch_labels is None:
            return self.feats, self.labels
        return self.feats.reshape(-1, self.feats.shape[-1]), self.patch_labels.reshape(-1).to(torch.int64)


@torch.no_grad()
def task_data(task: str, dataset, indices, backbones: list, batch_size: int) -> list[TaskData]:
    """Run each backbone (all with the first one's preprocessing) to its final layer on the images
    `indices`, decoding each image once, and keep what a `task` probe reads: one TaskData each."""
    first = backbones[0]
    if any(repr(b.transform) != repr(first.transform) for b in backbones):
        raise VisaeError("task_data runs backbones side by side only when they share one preprocessing")
    feats, labels, masks = [[] for _ in backbones], [], []
    for pixels, y, m in task_batches(dataset, indices, first, batch_size, desc=f"{task} features"):
        for out, backbone in zip(feats, backbones):
            layout = backbone.layout
            tokens = backbone.final_tokens(pixels.to(backbone.device))
            out.append(task_features(task, tokens, layout.n_prefix, layout.n_cls > 0).float().cpu())
        labels.append(y)
        masks.append(m)
    votes = None
    if task == "segmentation":
        masks = torch.cat(masks)
        votes = torch.from_numpy(np.stack([patch_labels(mask.numpy(), first.layout.grid, dataset.ignore_index,
                                                        dataset.patch_vote) for mask in masks]).astype(np.int64))
    else:
        masks = None
    return [TaskData(torch.cat(f), torch.cat(labels), masks, votes) for f in feats]


def fit_softmax(x: torch.Tensor, y: torch.Tensor, n_classes: int, settings: list[tuple[float, float]], steps: int,
                seed: int, ignore_index: int | None = None, device="cpu") -> list[tuple[torch.Tensor, ...]]:
    """Softmax regressions on the rows `x` [n, d] (standardised by their float64 mean and std),
    one per (lr, weight decay) in `settings`, trained side by side with AdamW for `steps` full
    batch steps (fixed-order minibatches past MAX_ROWS_PER_STEP rows); rows labelled
    `ignore_index` are left out. Deterministic: the initial weights come from `seed`. Trains on
    `device` (the paper's segmentation probe fits about a million patch rows).
    Returns (weight [C, d], bias [C], mean [d], std [d]) per setting, on the CPU."""
    if ignore_index is not None:
        keep = y != ignore_index
        x, y = x[keep], y[keep]
    if len(y) == 0:
        raise VisaeError("no training rows left for the probe: every label is the ignore label")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise VisaeError(f"probe label {int(y.min() if y.min() < 0 else y.max())} is outside 0..{n_classes - 1}")
    x, y = x.to(device), y.to(device)
    x64 = x.double()
    mean, std = x64.mean(0), x64.std(0, unbiased=False).clamp_min(1e-6)
    xs = ((x64 - mean) / std).float()
    g, d, n_set = torch.Generator().manual_seed(seed), xs.shape[1], len(settings)
    weights = [torch.nn.Parameter(0.01 * torch.randn(n_classes, d, generator=g).to(xs.device)) for _ in settings]
    biases = [torch.nn.Parameter(torch.zeros(n_classes, device=xs.device)) for _ in settings]
    groups = []
    for (lr, wd), w, b in zip(settings, weights, biases):
        groups += [{"params": [w], "lr": lr, "weight_decay": wd}, {"params": [b], "lr": lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups)
    if len(y) > MAX_ROWS_PER_STEP:
        order = torch.randperm(len(y), generator=g).split(MAX_ROWS_PER_STEP)
        batches = [(xs[rows.to(xs.device)], y[rows].to(xs.device)) for rows in order]
    else:
        batches = [(xs, y.to(xs.device))]
    # one matmul for every setting: logits [rows, settings * classes], one softmax row per setting
    targets = [yb.repeat_interleave(n_set) for _, yb in batches]
    with torch.enable_grad():
        for step in progress(range(steps), desc="probe fit", unit="steps"):
            xb, target = batches[step % len(batches)][0], targets[step % len(batches)]
            logits = torch.addmm(torch.cat(biases), xb, torch.cat(weights).t()).view(-1, n_classes)
            loss = F.cross_entropy(logits, target) * n_set  # the sum of the settings' mean losses
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [(w.detach().cpu(), b.detach().cpu(), mean.float().cpu(), std.float().cpu()) for w, b in zip(weights, biases)]


def score_probe(probe: LinearProbe, data: TaskData, grid, image_size, batch_size: int = 256
                ) -> tuple[float, np.ndarray]:
    """(score, per-class scores): top-1 and per-class accuracy (classification), or pixel-level
    mIoU and per-class IoU against the model-resolution masks (segmentation); NaN for a class
    absent from the data."""
    n_classes = len(probe.classes)
    if probe.task == "classification":
        pred = probe.logits(data.feats).argmax(1).cpu()
        correct = (pred == data.labels).double()
        counts = torch.bincount(data.labels, minlength=n_classes).double()
        hits = torch.bincount(data.labels, weights=correct, minlength=n_classes)
        per_class = torch.where(counts > 0, hits / counts.clamp_min(1), torch.nan).numpy()
        return float(correct.mean()), per_class
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    for start in range(0, len(data.feats), batch_size):
        logits = probe.logits(data.feats[start:start + batch_size])
        pred = pixel_predictions(probe, logits, grid, image_size)
        confusion += confusion_matrix(pred, data.masks[start:start + batch_size], n_classes, probe.ignore_index)
    return iou_from_confusion(confusion, probe.ignore_index)


def train_task_probe(task: str, backbone, train: TaskData, test: TaskData, classes: list[str],
                     ignore_index: int | None, *, lrs, weight_decays, steps: int, val_fraction: float,
                     seed: int, device="cpu") -> tuple[LinearProbe, dict]:
    """The probe recipe: each (lr, weight decay) fitted on the training images less a seeded
    validation split and scored there, the best pair (first on ties) refitted on all training
    images and scored on `test`. Returns the probe and {grid, chosen, test_score, per_class}."""
    n = len(train.labels)
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise VisaeError(f"{n} training image(s) leave none to fit on after the validation split "
                         f"(--val-fraction {val_fraction}): use more training images")
    perm = np.random.default_rng([seed, 2]).permutation(n)
    fit_part, val_part = train.subset(np.sort(perm[n_val:])), train.subset(np.sort(perm[:n_val]))
    settings = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    grid, image_size = backbone.layout.grid, backbone.image_size
    ignore = ignore_index if task == "segmentation" else None

    def fit(data: TaskData, chosen) -> list[LinearProbe]:
        x, y = data.rows()
        return [LinearProbe(task, *fitted, classes=list(classes), ignore_index=ignore)
                for fitted in fit_softmax(x, y, len(classes), chosen, steps, seed, ignore, device)]

    val_scores = [score_probe(p, val_part, grid, image_size)[0] for p in fit(fit_part, settings)]
    best = int(np.nanargmax(val_scores)) if not np.isnan(val_scores).all() else 0
    probe = fit(train, [settings[best]])[0]
    score, per_class = score_probe(probe, test, grid, image_size)
    return probe, {
        "grid": [{"lr": lr, "weight_decay": wd, "val_score": _finite_or_none(v)} for (lr, wd), v in zip(settings, val_scores)],
        "chosen": {"lr": settings[best][0], "weight_decay": settings[best][1]},
        "test_score": _finite_or_none(score),
        "per_class": [_finite_or_none(v) for v in per_class],
    }


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def random_init_spec(spec: dict, init_seed: int) -> dict:
    """The spec of a random-init model of `spec`'s architecture: same source, arch, model_kwargs,
    image size and preprocessing, no weights, no pretrained tag, `init_seed`. A `visae pretrain`
    model becomes the timm ViT its weights' config.json states (head included); an open_clip model
    whose tag was trained with QuickGELU (OpenAI's CLIP) keeps it, through the `-quickgelu` config."""
    from visae.models.registry import with_pretrain_architecture

    base = dict(spec)
    if base.get("source") == "pretrain":
        if not base.get("weights"):
            raise VisaeError("a `visae pretrain` model needs its weights file (--weights) to know its architecture")
        base = dict(with_pretrain_architecture(base, base["weights"]), source="timm")
    if base.get("source") == "open_clip" and base.get("pretrained"):
        import open_clip

        from visae.models.registry import open_clip_quick_gelu

        arch = str(base["arch"])
        if open_clip_quick_gelu(open_clip, arch, base["pretrained"]) and f"{arch}-quickgelu" in open_clip.list_models():
            base["arch"] = f"{arch}-quickgelu"  # the tag's activation, which a tag-less build would not pick
    out = {k: base[k] for k in RANDOM_INIT_KEYS if base.get(k) is not None}
    if "name" in out:
        out["name"] = f"{out['name']}-random-init"
    return dict(out, pretrained=None, weights=None, init_seed=int(init_seed))


def sample_indices(n: int, count: int | None, seed) -> list[int]:
    """A seeded sample of `count` of `n` image indices, sorted; all of them when `count` is None or larger."""
    if count is None or count >= n:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=count, replace=False))


def check_task_datasets(task: str, train, test, train_idx: list[int], test_idx: list[int]) -> None:
    """Refuse, in one line, datasets a `task` probe cannot use."""
    for role, ds, idx in (("train", train, train_idx), ("test", test, test_idx)):
        if not idx:
            raise VisaeError(f"the {role} dataset {ds.name} gives no images to probe: check its root and split")
        if task == "segmentation" and not ds.has_masks:
            raise VisaeError(f"a segmentation probe needs masks and the {role} dataset {ds.name} has none "
                             f"(fashion-mnist: segmentation: true; or fashion-mnist-mosaic, segfolder)")
        if task == "classification":
            labels = ds.label_array()[idx]
            if (labels < 0).all():
                raise VisaeError(f"a classification probe needs image labels and the {role} dataset {ds.name} "
                                 f"has none (every label is -1): use a labelled dataset")
            if (labels < 0).any():
                raise VisaeError(f"{int((labels < 0).sum())} of the {len(idx)} sampled {role} images of {ds.name} "
                                 f"have no label (-1): a classification probe needs every image labelled")
    if list(train.classes) != list(test.classes) or train.ignore_index != test.ignore_index:
        raise VisaeError(f"the train dataset {train.name} ({len(train.classes)} classes, ignore {train.ignore_index}) "
                         f"and the test dataset {test.name} ({len(test.classes)} classes, ignore {test.ignore_index}) "
                         f"have different class lists: probe on datasets of one label set")



def add_cli(subparsers) -> None:
    import argparse

    from visae.args import device, nonneg_float, nonneg_int, open_fraction, positive_float, positive_int

    p = subparsers.add_parser("probe", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model", required=True, help="the model's config entry as JSON")
    p.add_argument("--weights", default=None, help="the model's weights file (a `visae pretrain` model's)")
    p.add_argument("--train", required=True, help="the training dataset's entry as JSON")
    p.add_argument("--test", required=True, help="the test dataset's entry as JSON")
    p.add_argument("--train-images", type=positive_int, default=None, help="a seeded sample of this many (default all)")
    p.add_argument("--test-images", type=positive_int, default=None, help="a seeded sample of this many (default all)")
    p.add_argument("--lrs", type=positive_float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--weight-decays", type=nonneg_float, nargs="+", default=[1e-4, 1e-2])
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--val-fraction", type=open_fraction, default=0.2)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_probe)


def cmd_probe(args) -> int:
    import time

    from visae.atomic import clean_stale_temps
    from visae.data import open_dataset
    from visae.models import load_backbone
    from visae.provenance import provenance

    started = time.time()
    out = Path(args.out)
    (out / PROBE).unlink(missing_ok=True)  # a stale marker never outlives a changed probe
    if out.is_dir():
        clean_stale_temps(out)
    spec = json_object(args.model, "--model")
    if args.weights is not None:
        spec["weights"] = str(args.weights)
    train_spec, test_spec = json_object(args.train, "--train"), json_object(args.test, "--test")
    train_ds, test_ds = open_dataset(train_spec), open_dataset(test_spec)
    train_idx = sample_indices(len(train_ds), args.train_images, [args.seed, 0])
    test_idx = sample_indices(len(test_ds), args.test_images, [args.seed, 1])
    check_task_datasets(args.task, train_ds, test_ds, train_idx, test_idx)
    recipe = {"lrs": args.lrs, "weight_decays": args.weight_decays, "steps": args.steps,
              "val_fraction": args.val_fraction, "seed": args.seed, "device": args.device}
    classes, ignore = list(train_ds.classes), train_ds.ignore_index

    random_spec = random_init_spec(spec, args.seed)
    backbone, random_bb = (load_backbone(s).to(args.device) for s in (spec, random_spec))
    # both models see the same pixels (one decode) unless their preprocessing differs
    passes = [[backbone, random_bb]] if repr(backbone.transform) == repr(random_bb.transform) else \
        [[backbone], [random_bb]]
    train_data = [d for group in passes for d in task_data(args.task, train_ds, train_idx, group, args.batch_size)]
    test_data = [d for group in passes for d in task_data(args.task, test_ds, test_idx, group, args.batch_size)]
    probe, result = train_task_probe(args.task, backbone, train_data[0], test_data[0], classes, ignore, **recipe)
    _, baseline = train_task_probe(args.task, random_bb, train_data[1], test_data[1], classes, ignore, **recipe)
    metric = "top1" if args.task == "classification" else "miou"
    probe.meta = {
        "model": backbone.to_dict(), "model_spec": spec,
        "train": {"dataset": train_ds.describe(), "spec": train_spec, "images": train_idx},
        "test": {"dataset": test_ds.describe(), "spec": test_spec, "images": test_idx},
        **result, "metric": metric,
        "random_init": {"test_score": baseline["test_score"], "per_class": baseline["per_class"],
                        "init_seed": random_spec["init_seed"], "spec": random_spec, "chosen": baseline["chosen"]},
        "provenance": provenance({"task": args.task, "model": spec, "train": train_spec, "test": test_spec,
                                  "train_images": args.train_images, "test_images": args.test_images,
                                  "batch_size": args.batch_size, **recipe},
                                 seeds={"probe": args.seed, "random_init": random_spec["init_seed"]}, started=started),
    }
    probe.save(out)
    print(f"probe {args.task} {backbone.name} on {test_ds.name} ({len(test_idx)} images): {metric} "
          f"{_fmt(result['test_score'])} vs {_fmt(baseline['test_score'])} at random init "
          f"(lr {result['chosen']['lr']:g}, weight decay {result['chosen']['weight_decay']:g}) -> {out}")
    return 0


def _fmt(score: float | None) -> str:
    return "nan" if score is None else f"{score:.4f}"

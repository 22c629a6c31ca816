"""Probes of a representation: a weighted kNN and a linear probe on its features.

They score how much class information features carry (the demo's pretraining reports them for
its ViTs; the interventions will score edited features with them). Both are deterministic: the
kNN has no randomness, the probe trains full batch from a fixed seed inside its own RNG scope.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visae.errors import VisaeError
from visae.layout import PROBE, PROBE_WEIGHTS


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

TASKS = ("classification", "segmentation")


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
        if self.task == "segmentation":
            return tokens[:, n_prefix:]
        return tokens[:, 0] if has_cls else tokens[:, n_prefix:].mean(1)

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


def task_batches(dataset, indices: Sequence[int], backbone, batch_size: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(pixels [b, 3, H, W] float, labels [b] int64, masks [b, H, W] int64 or None) over the
    images `indices` in that order; masks through `backbone.mask_transform` (model resolution)."""
    fill = dataset.ignore_index if dataset.ignore_index is not None else 0
    indices = [int(i) for i in indices]
    for start in range(0, len(indices), batch_size):
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

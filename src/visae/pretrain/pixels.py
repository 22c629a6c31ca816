"""The demo ViTs' pixels: the backbone's own preprocessing on uint8 batches, and the augmentations.

Geometry runs once per image and is cached as uint8, so a training step only converts and
normalises a batch; the augmentations run batched on tensors, every random number from one seeded
`torch.Generator`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class Pixels:
    """The backbone's own preprocessing, applied to uint8 greyscale images in batches.

    Geometry (resize/crop) runs once per image on PIL 'L' images and is cached as uint8; the value
    steps (to-tensor, normalise) run per batch. `check` proves the result equals the backbone's
    transform on the RGB image the dataset yields, bit for bit.
    """

    _GEOMETRIC = {"Resize", "CenterCrop", "ResizeKeepRatio", "CenterCropOrPad"}
    _TO_FLOAT = {"ToTensor", "MaybeToTensor"}

    def __init__(self, transform):
        self.transform = transform
        steps = list(getattr(transform, "transforms", [transform]))
        kinds = [getattr(s, "__name__", None) or type(s).__name__ for s in steps]
        self.geometry, rest = [], []
        for step, kind in zip(steps, kinds):
            (self.geometry if kind in self._GEOMETRIC and not rest else rest).append((kind, step))
        mean = std = None
        fast = len(rest) in (1, 2) and rest[0][0] in self._TO_FLOAT
        if fast and len(rest) == 2:
            fast = rest[1][0] == "Normalize"
            if fast:
                mean = torch.as_tensor(rest[1][1].mean, dtype=torch.float32).reshape(-1, 1, 1)
                std = torch.as_tensor(rest[1][1].std, dtype=torch.float32).reshape(-1, 1, 1)
        self.fast = fast
        self.mean = mean if mean is not None else torch.zeros(3, 1, 1)
        self.std = std if std is not None else torch.ones(3, 1, 1)

    def geometry_u8(self, gray: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 -> (N, h, w) uint8 after the transform's resize/crop."""
        from PIL import Image

        if not self.fast:
            return np.ascontiguousarray(gray)
        out = []
        for a in gray:
            im = Image.fromarray(a, "L")
            for _, step in self.geometry:
                im = step(im)
            out.append(np.asarray(im))
        return np.stack(out) if out else np.zeros((0, *gray.shape[1:]), np.uint8)

    def to_unit(self, u8: torch.Tensor) -> torch.Tensor:
        """(B, h, w) uint8 -> (B, 3, h, w) float in [0, 1] (what ToTensor gives)."""
        return u8.unsqueeze(1).to(torch.float32).div(255).expand(-1, 3, -1, -1)

    def normalise(self, unit: torch.Tensor) -> torch.Tensor:
        return (unit - self.mean) / self.std

    def batch(self, u8: torch.Tensor) -> torch.Tensor:
        """Cached uint8 geometry -> model input, equal to `transform(image)` for each image."""
        if not self.fast:
            from PIL import Image
            return torch.stack([self.transform(Image.fromarray(a.numpy(), "L").convert("RGB")) for a in u8])
        return self.normalise(self.to_unit(u8))

    def check(self, gray: np.ndarray) -> None:
        from PIL import Image

        if not self.fast or len(gray) == 0:
            return
        ref = torch.stack([self.transform(Image.fromarray(a, "L").convert("RGB")) for a in gray])
        got = self.batch(torch.from_numpy(self.geometry_u8(gray)))
        if got.shape != ref.shape or not torch.equal(got, ref):
            # Not an exact match: fall back to the transform itself, image by image (slow, exact).
            self.fast = False


# --------------------------------------------------------------------------- augmentations

def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def simclr_views(unit: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view per image of a (B, C, H, W) batch in [0, 1], for 28x28 greyscale garments.

    Random resized crop (area 35-100 %, aspect 3/4-4/3), horizontal flip, rotation up to 15
    degrees (one affine warp, black outside), brightness/contrast jitter, and random erasing of a
    small rectangle with probability 0.5. Every random number comes from `gen`.
    """
    b, _, h, w = unit.shape
    area = _uniform(gen, b, 0.35, 1.0)
    log_ratio = _uniform(gen, b, math.log(3 / 4), math.log(4 / 3))
    ratio = log_ratio.exp()
    sw = (area * ratio).sqrt().clamp(max=1.0)
    sh = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    angle = _uniform(gen, b, -15.0, 15.0) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([cos * sw * flip, -sin * sh, cx], dim=1),
        torch.stack([sin * sw * flip, cos * sh, cy], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    x = F.grid_sample(unit[:, :1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = _uniform(gen, b, 0.6, 1.4).view(b, 1, 1, 1)
    bright = _uniform(gen, b, -0.15, 0.15).view(b, 1, 1, 1)
    x = (x * contrast + bright * (x > 0)).clamp(0, 1)  # background stays black
    erase = torch.rand(b, generator=gen) < 0.5
    ea = _uniform(gen, b, 0.02, 0.15) * h * w
    er = _uniform(gen, b, math.log(0.3), math.log(3.3)).exp()
    eh = (ea * er).sqrt().clamp(1, h - 1).floor()
    ew = (ea / er).sqrt().clamp(1, w - 1).floor()
    ey = (torch.rand(b, generator=gen) * (h - eh + 1)).floor()
    ex = (torch.rand(b, generator=gen) * (w - ew + 1)).floor()
    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    box = ((rows >= ey.view(b, 1, 1)) & (rows < (ey + eh).view(b, 1, 1))
           & (cols >= ex.view(b, 1, 1)) & (cols < (ex + ew).view(b, 1, 1)) & erase.view(b, 1, 1))
    x = x.masked_fill(box.unsqueeze(1), 0.0)
    return x.expand(-1, unit.shape[1], -1, -1)


def flip_views(unit: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Supervised augmentation: random horizontal flip."""
    flip = (torch.rand(unit.shape[0], generator=gen) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, unit.flip(-1), unit)

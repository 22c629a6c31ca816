"""Fashion-MNIST mosaics: several garments tiled into one image, each garment's foreground pixels
labelled with its class and the background with its own label.

The demo's segmentation task: a single Fashion-MNIST image holds one class, so a change on the
"other" patches would only ever be background; a mosaic holds several. Everything derives from
the split and a seed: mosaic i tiles a fixed run of a seeded permutation of the split's images,
so no garment is used twice until the split runs out (then a fresh permutation starts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from visae.data.base import ImageDataset, Sample, require_dir
from visae.data.fashion_mnist import BACKGROUND, CLASSES, SPLITS, FashionMNIST
from visae.errors import VisaeError

FORMAT = "fashion-mnist-mosaic"
DEFAULTS = {"grid": 2, "size": 2000, "seed": 0, "threshold": 0}
MAX_GRID = 8  # 8x8 garments: a 224x224 image
SIDE = 28  # a Fashion-MNIST garment's side in pixels


class FashionMNISTMosaic(ImageDataset):
    """`size` mosaics of grid x grid Fashion-MNIST garments (RGB, 28*grid pixels a side), masks of
    class indices (background = 10), no image-level label (-1)."""

    def __init__(self, garments: FashionMNIST, grid: int, size: int, seed: int, threshold: int, spec: dict):
        self.spec = spec
        self.name = spec.get("name") or FORMAT
        self.grid, self.threshold = grid, threshold
        self.classes = CLASSES + ["background"]
        self.ignore_index = None
        self.has_masks = True
        self._garments = garments
        self._labels = garments.label_array()
        n, per = len(garments), grid * grid
        rng = np.random.default_rng(seed)
        passes = -(-size * per // n)  # ceil: how many permutations of the split the mosaics use up
        order = np.concatenate([rng.permutation(n) for _ in range(passes)])
        self._tiles = order[:size * per].reshape(size, per)

    def __len__(self) -> int:
        return len(self._tiles)

    def garments(self, i: int) -> np.ndarray:
        """The split's indices of mosaic i's garments, row-major over its grid."""
        return self._tiles[i].copy()

    def _tile(self, parts: np.ndarray) -> np.ndarray:
        """(grid*grid, 28, 28) -> (28*grid, 28*grid), row-major."""
        g = self.grid
        return parts.reshape(g, g, SIDE, SIDE).transpose(0, 2, 1, 3).reshape(g * SIDE, g * SIDE)

    def _load(self, i: int) -> Sample:
        idx = self._tiles[i]
        gray = self._garments.images()[idx]
        labels = self._labels[idx].astype(np.int64)
        mask = np.where(gray > self.threshold, labels[:, None, None], BACKGROUND)
        image = Image.fromarray(self._tile(gray), "L").convert("RGB")
        return Sample(image=image, label=-1, mask=self._tile(mask).astype(np.int64))

    def label_array(self) -> np.ndarray:
        return np.full(len(self), -1, dtype=np.int64)


def _int_option(opts: dict, key: str, low: int, high: int | None) -> int:
    value = opts.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise VisaeError(f"{FORMAT} option {key} must be an integer {allowed}; got {value!r}")
    return value


def open_fashion_mnist_mosaic(root: Path, split: str | None, opts: dict, spec: dict) -> ImageDataset:
    require_dir(root, "Fashion-MNIST folder")
    split = spec["split"] = split or "train"
    if split not in SPLITS:
        raise VisaeError(f"{FORMAT} split must be 'train' or 'test'; got split: {split!r}")
    grid = _int_option(opts, "grid", 1, MAX_GRID)
    size = _int_option(opts, "size", 1, None)
    seed = _int_option(opts, "seed", 0, None)
    threshold = _int_option(opts, "threshold", 0, 254)
    garments = FashionMNIST(root, split, segmentation=False, threshold=threshold, spec={"format": "fashion-mnist"})
    return FashionMNISTMosaic(garments, grid, size, seed, threshold, spec)

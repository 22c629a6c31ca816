"""The dataset protocol every format implements, plus the shared decode helpers.

Later stages (extraction, probes, interventions) only see `ImageDataset` and `Sample`, so a
new format is one class here and one entry in the registry; nothing downstream changes.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visae.errors import VisaeError

# Image files we list in folders; PIL decodes all of them. Lower case, compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Sample:
    """One image with its labels; `mask` is per-pixel at the image's native size, or None."""

    image: Image.Image
    label: int
    mask: np.ndarray | None = None


class ImageDataset:
    """Base class: a finite, deterministically ordered list of labelled images.

    Subclasses set `name`, `classes`, `ignore_index`, `has_masks` and implement `__len__`,
    `_load(i)` and `label_array()`. `spec` keeps the resolved spec dict, for provenance.
    `patch_vote` says how extraction votes per-patch labels from masks (see data.patches.VOTES).
    """

    name: str = ""
    classes: list[str]
    ignore_index: int | None = None
    has_masks: bool = False
    patch_vote: str = "labelled-majority"
    spec: dict

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} ({n} images)")
        return self._load(i)

    def _load(self, i: int) -> Sample:
        raise NotImplementedError

    def label_array(self) -> np.ndarray:
        """All image-level labels as int64, without decoding any image."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "name": self.name,
            "format": self.spec.get("format"),
            "root": self.spec.get("root"),
            "split": self.spec.get("split"),
            "size": len(self),
            "classes": len(self.classes),
            "has_masks": self.has_masks,
            "ignore_index": self.ignore_index,
            "patch_vote": self.patch_vote if self.has_masks else None,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return f"<{type(self).__name__} {d['name']} split={d['split']} n={d['size']} classes={d['classes']}>"


def decode_image(source: str | os.PathLike | bytes, name: str | os.PathLike | None = None) -> Image.Image:
    """Decode fully now (not lazily) so a corrupt file fails here, with its name, as one line."""
    name = name if name is not None else source
    try:
        fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(fh) as im:
            im.load()
            return _to_8bit(im).convert("RGB")
    except FileNotFoundError as err:
        raise VisaeError(f"image file missing: {name}") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise VisaeError(f"cannot decode image {name}: {err}") from err


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit greyscale (PIL modes I;16*, and I, which PNG loaders also use for it) scaled to
    8 bits: convert("RGB") would clip every value above 255 to white."""
    if im.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return im
    wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # mode L


def decode_mask(path: str | os.PathLike) -> np.ndarray:
    """A label PNG as (H, W) int64 class indices; palette/grey values are the indices."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise VisaeError(
                    f"label image {path} has mode {im.mode}; expected a single-channel label PNG"
                )
            arr = np.asarray(im)
    except FileNotFoundError as err:
        raise VisaeError(f"label image missing: {path}") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise VisaeError(f"cannot decode label image {path}: {err}") from err
    return arr.astype(np.int64)


def check_mask_size(mask: np.ndarray, image: Image.Image, where: str) -> None:
    if mask.shape != (image.height, image.width):
        raise VisaeError(
            f"label image for {where} is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{image.width}x{image.height}"
        )


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise VisaeError(f"{what} not found: {path} is not a folder")
    return path


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (deterministic across file systems)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))

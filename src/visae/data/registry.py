"""Spec dict -> dataset. The one place that knows every format, its options and defaults,
so config validation errors name the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

from visae.data.base import ImageDataset
from visae.data.cub import open_cub
from visae.data.fashion_mnist import DEBIAN_DIR, open_fashion_mnist
from visae.data.folders import open_imagefolder, open_imagenet_1k, open_imagenet_sample
from visae.data.mosaic import open_fashion_mnist_mosaic
from visae.data.patches import VOTES
from visae.data.segfolder import open_ade20k, open_camvid, open_segfolder
from visae.errors import VisaeError

COMMON_KEYS = ("format", "root", "split", "name")

# format -> (opener, extra option keys, default root or None)
FORMATS = {
    "imagefolder": (open_imagefolder, (), None),
    "fashion-mnist": (open_fashion_mnist, ("segmentation", "threshold"), DEBIAN_DIR),
    "fashion-mnist-mosaic": (open_fashion_mnist_mosaic, ("grid", "size", "seed", "threshold"), DEBIAN_DIR),
    "segfolder": (open_segfolder, ("layout",), None),
    "ade20k": (open_ade20k, (), None),
    "camvid": (open_camvid, (), None),
    "cub-200-2011": (open_cub, (), None),
    "imagenet-1k": (open_imagenet_1k, ("hf_disk",), None),
    "imagenet-sample": (open_imagenet_sample, (), None),
}
# Formats that can carry segmentation masks take patch_vote: how a patch's label is voted.
MASK_FORMATS = ("fashion-mnist", "fashion-mnist-mosaic", "segfolder", "ade20k", "camvid")


def open_dataset(spec: dict) -> ImageDataset:
    """Open the dataset a spec describes: {'format': ..., 'root': ..., 'split': ..., options}."""
    if not isinstance(spec, dict):
        raise VisaeError(f"dataset spec must be a mapping with a 'format' key; got {type(spec).__name__}")
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise VisaeError(f"unknown dataset format: {fmt!r}; allowed: {', '.join(FORMATS)}")
    opener, options, default_root = FORMATS[fmt]
    allowed = COMMON_KEYS + tuple(options) + (("patch_vote",) if fmt in MASK_FORMATS else ())
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise VisaeError(
            f"unknown key(s) {', '.join(unknown)} for dataset format {fmt}; allowed: {', '.join(allowed)}"
        )
    vote = spec.get("patch_vote")
    if vote is not None and vote not in VOTES:
        raise VisaeError(f"dataset key patch_vote must be one of {', '.join(VOTES)}; got {vote!r}")
    root = spec.get("root") or default_root
    if root is None:
        raise VisaeError(f"dataset format {fmt} needs root: the folder that holds it")
    split = spec.get("split")
    if split is not None and not isinstance(split, str):
        raise VisaeError(f"dataset key split must be a string; got {split!r}")
    resolved = dict(spec, root=str(root))
    opts = {k: spec[k] for k in options if k in spec}
    dataset = opener(Path(root).expanduser(), split, opts, resolved)
    if vote is not None:
        if not dataset.has_masks:
            raise VisaeError(f"dataset key patch_vote needs segmentation masks, and this {fmt} dataset has none")
        dataset.patch_vote = vote
    return dataset


def parse_dataset_arg(text: str) -> dict:
    """CLI shorthand `FORMAT[:ROOT]` -> spec, e.g. 'camvid:/d/camvid', 'fashion-mnist'."""
    fmt, sep, root = text.partition(":")
    fmt = fmt.strip()
    if fmt not in FORMATS:
        raise VisaeError(f"unknown dataset format: {fmt!r} in {text!r}; expected FORMAT[:ROOT] with FORMAT one of {', '.join(FORMATS)}")
    spec: dict = {"format": fmt}
    if sep and root:
        spec["root"] = root
    elif FORMATS[fmt][2] is not None:
        spec["root"] = str(FORMATS[fmt][2])
    else:
        raise VisaeError(f"dataset {text!r} needs a root folder: {fmt}:ROOT")
    return spec

"""Folder-based classification sets: ImageFolder, ImageNet-1k (folder or local HF copy),
and the flat imagenet-sample folder.

ImageFolder listing reuses torchvision's `find_classes`/`make_dataset`, so class indices match
what torchvision users expect (sorted folder names).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from visae.data.base import IMG_EXTENSIONS, ImageDataset, Sample, decode_image, list_images, require_dir
from visae.errors import VisaeError


class FolderDataset(ImageDataset):
    """A list of (path, label) pairs with class names; images decoded on access."""

    def __init__(self, name: str, samples: list[tuple[str, int]], classes: list[str], spec: dict):
        self.name = name
        self.samples = samples
        self.classes = classes
        self.spec = spec
        self._labels = np.fromiter((t for _, t in samples), dtype=np.int64, count=len(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> Sample:
        path, label = self.samples[i]
        return Sample(image=decode_image(path), label=int(label), mask=None)

    def label_array(self) -> np.ndarray:
        return self._labels.copy()


def scan_imagefolder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """torchvision's listing, with its errors turned into one-line VisaeErrors."""
    from torchvision.datasets.folder import find_classes, make_dataset  # lazy: keeps `visae --help` fast

    require_dir(root, "image folder")
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError as err:
        raise VisaeError(f"image folder {root} is empty: expected <class>/<image> subfolders") from err
    try:
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise VisaeError(f"image folder {root}: {str(err).splitlines()[0]}") from err
    return samples, classes


def open_imagefolder(root: Path, split: str | None, opts: dict, spec: dict) -> ImageDataset:
    """`<root>/<class>/<file>`, or `<root>/<split>/<class>/<file>` when a split is given."""
    require_dir(root, "dataset root")
    folder = root / split if split else root
    if split and not folder.is_dir():
        raise _missing_split(root, split, [p.name for p in root.iterdir() if p.is_dir()])
    samples, classes = scan_imagefolder(folder)
    return FolderDataset(spec.get("name") or "imagefolder", samples, classes, spec)


def open_imagenet_sample(root: Path, split: str | None, opts: dict, spec: dict) -> ImageDataset:
    """Flat `<wnid>_<name>.JPEG` files; the wnid prefix is the class (sorted wnids -> indices)."""
    if split not in (None, "val", "validation"):
        raise VisaeError(f"imagenet-sample has only one split (val); got split: {split!r}")
    require_dir(root, "dataset root")
    files = list_images(root)
    if not files:
        raise VisaeError(f"imagenet-sample folder {root} is empty: expected <wnid>_<name>.JPEG files")
    wnids = []
    for f in files:
        wnid, sep, _ = f.name.partition("_")
        if not sep:
            raise VisaeError(f"imagenet-sample file {f} is not named <wnid>_<name>.<ext>")
        wnids.append(wnid)
    classes = sorted(set(wnids))
    idx = {w: i for i, w in enumerate(classes)}
    samples = [(str(f), idx[w]) for f, w in zip(files, wnids)]
    return FolderDataset(spec.get("name") or "imagenet-sample", samples, classes, spec)


# --- ImageNet-1k ------------------------------------------------------------------------------

HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def _missing_split(root: Path, split: str, have: list[str]) -> VisaeError:
    return VisaeError(f"split {split!r} not found under {root}; available: {', '.join(sorted(have)) or 'none'}")


def open_imagenet_1k(root: Path, split: str | None, opts: dict, spec: dict) -> ImageDataset:
    """ImageFolder `<root>/<split>/<wnid>/...`, or a local `save_to_disk` copy (never the hub)."""
    require_dir(root, "dataset root")
    split = spec["split"] = split or "val"
    hf = opts.get("hf_disk")
    if hf is not None and not isinstance(hf, bool):
        raise VisaeError(f"imagenet-1k option hf_disk must be true or false; got {hf!r}")
    if hf is None:
        hf = any((root / m).is_file() for m in HF_MARKERS) or (root / split / "state.json").is_file()
    if hf:
        return HFDiskDataset(root, split, spec)
    if split not in ("train", "val"):
        raise VisaeError(f"imagenet-1k split must be 'train' or 'val'; got split: {split!r}")
    folder = root / split
    if not folder.is_dir():
        raise _missing_split(root, split, [p.name for p in root.iterdir() if p.is_dir()])
    samples, classes = scan_imagefolder(folder)
    return FolderDataset(spec.get("name") or "imagenet-1k", samples, classes, spec)


class HFDiskDataset(ImageDataset):
    """A Hugging Face `datasets` copy saved with `save_to_disk`: columns `image` and `label`.

    Images are read as raw bytes (decode=False) and decoded here, so a corrupt one raises our
    one-line error naming the row instead of a deep `datasets` traceback.
    """

    def __init__(self, root: Path, split: str, spec: dict):
        import datasets  # heavy import; only when this format is used

        self.spec = spec
        self.name = spec.get("name") or "imagenet-1k"
        self.root = root
        try:
            if (root / split / "state.json").is_file() and not (root / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(root / split))
            else:
                ds = datasets.load_from_disk(str(root))
        except (FileNotFoundError, ValueError, OSError, json.JSONDecodeError) as err:
            raise VisaeError(f"cannot load the saved HF dataset at {root}: {err}") from err
        if isinstance(ds, datasets.DatasetDict):
            have = list(ds.keys())
            if split not in ds and split == "val" and "validation" in ds:
                split = "validation"
            if split not in ds:
                raise _missing_split(root, split, have)
            ds = ds[split]
            spec["split"] = split
        missing = [c for c in ("image", "label") if c not in ds.column_names]
        if missing:
            raise VisaeError(
                f"saved HF dataset at {root} lacks column(s) {', '.join(missing)}; "
                f"has {', '.join(ds.column_names)} (expected image and label)"
            )
        if not isinstance(ds.features["image"], datasets.Image):
            raise VisaeError(f"saved HF dataset at {root}: column 'image' is {ds.features['image']}, expected an Image feature")
        self._ds = ds.cast_column("image", datasets.Image(decode=False))
        self._labels = np.asarray(ds.with_format("arrow")["label"].to_numpy(), dtype=np.int64)
        feat = ds.features["label"]
        if isinstance(feat, datasets.ClassLabel):
            self.classes = list(feat.names)
        else:
            self.classes = [str(i) for i in range(int(self._labels.max(initial=-1)) + 1)]

    def __len__(self) -> int:
        return len(self._ds)

    def _load(self, i: int) -> Sample:
        row = self._ds[i]
        img = row["image"] or {}
        where = f"{self.root} row {i}" + (f" ({img['path']})" if img.get("path") else "")
        if img.get("bytes"):
            image = decode_image(img["bytes"], where)
        elif img.get("path"):
            image = decode_image(img["path"], where)
        else:
            raise VisaeError(f"cannot decode image {where}: no bytes or path stored")
        return Sample(image=image, label=int(row["label"]), mask=None)

    def label_array(self) -> np.ndarray:
        return self._labels.copy()

"""CUB-200-2011 from its official metadata files; labels 0-based, order by image id."""

from __future__ import annotations

from pathlib import Path

from visae.data.base import require_dir
from visae.data.folders import FolderDataset
from visae.errors import VisaeError

META = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def _read_table(path: Path) -> dict[int, str]:
    """`<id> <value>` lines -> {id: value}; the value may contain spaces (image paths do not)."""
    if not path.is_file():
        raise VisaeError(f"CUB-200-2011 metadata file missing: {path}")
    out: dict[int, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        try:
            out[int(key)] = value.strip()
        except ValueError as err:
            raise VisaeError(f"{path} line {n}: expected '<id> <value>', got {line!r}") from err
    return out


def open_cub(root: Path, split: str | None, opts: dict, spec: dict) -> FolderDataset:
    require_dir(root, "dataset root")
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"  # the official tarball's top folder
    split = spec["split"] = split or "train"
    if split not in ("train", "test"):
        raise VisaeError(f"cub-200-2011 split must be 'train' or 'test'; got split: {split!r}")
    images, labels, is_train, class_rows = (_read_table(root / m) for m in META)
    classes = []
    for k, cid in enumerate(sorted(class_rows), 1):
        if cid != k:
            raise VisaeError(f"{root / 'classes.txt'}: class ids must be 1..N; id {k} is missing")
        name = class_rows[cid]
        classes.append(name.split(".", 1)[1] if name[:3].isdigit() and "." in name else name)
    want = "1" if split == "train" else "0"
    samples = []
    for iid in sorted(images):
        if iid not in labels or iid not in is_train:
            raise VisaeError(f"CUB-200-2011: image id {iid} ({images[iid]}) lacks a class label or a train/test flag")
        if is_train[iid] != want:
            continue
        label = int(labels[iid]) - 1
        if not 0 <= label < len(classes):
            raise VisaeError(f"CUB-200-2011: image id {iid} has class {label + 1}, outside 1..{len(classes)}")
        samples.append((str(root / "images" / images[iid]), label))
    if not samples:
        raise VisaeError(f"CUB-200-2011 at {root} has no images in split {split!r}")
    return FolderDataset(spec.get("name") or "cub-200-2011", samples, classes, spec)

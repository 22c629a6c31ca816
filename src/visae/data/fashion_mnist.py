"""Fashion-MNIST: the four original idx files, read with numpy; optional derived masks; fetch.

Debian's `dataset-fashion-mnist` re-compresses the files, so their `.gz` MD5s differ from the
published ones while the decompressed bytes are identical. A file is accepted when either the
`.gz` matches the official MD5 or its decompressed content matches the official raw MD5.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import shutil
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from visae.atomic import atomic_path, clean_stale_temps
from visae.data.base import ImageDataset, Sample, require_dir
from visae.errors import VisaeError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# name -> (MD5 of the official .gz, MD5 of its decompressed idx bytes)
FILES = {
    "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}
SPLITS = {"train": ("train", 60000), "test": ("t10k", 10000)}
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
]
BACKGROUND = len(CLASSES)  # mask index of background pixels
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file (gzip or raw) into a uint8 array, checking magic and size."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError as err:
        raise VisaeError(f"Fashion-MNIST file missing: {path}") from err
    except (OSError, EOFError, zlib.error) as err:
        raise VisaeError(f"corrupt idx file {path}: {err}") from err
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise VisaeError(f"corrupt idx file {path}: magic number {got!r}, expected {magic:#010x}")
    ndim = magic & 0xFF
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise VisaeError(f"corrupt idx file {path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - offset != int(np.prod(dims)):
        raise VisaeError(
            f"corrupt idx file {path}: {len(raw) - offset} data bytes, header {dims} needs {int(np.prod(dims))}"
        )
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for p in (root / f"{stem}.gz", root / stem):
        if p.is_file():
            return p
    raise VisaeError(
        f"Fashion-MNIST file {stem}.gz not found in {root}: apt-get install dataset-fashion-mnist "
        f"or `visae fetch fashion-mnist --out DIR`"
    )


class FashionMNIST(ImageDataset):
    """28x28 greyscale garments as RGB. With `segmentation`, mask = class where pixel > threshold,
    background (index 10) elsewhere: a real-data segmentation task for the offline demo."""

    def __init__(self, root: Path, split: str, segmentation: bool, threshold: int, spec: dict):
        self.spec = spec
        self.name = spec.get("name") or "fashion-mnist"
        prefix, self._n = SPLITS[split]
        self._img_path = _find(root, f"{prefix}-images-idx3-ubyte")
        self._lbl_path = _find(root, f"{prefix}-labels-idx1-ubyte")
        self.segmentation = segmentation
        self.threshold = threshold
        self.has_masks = segmentation
        self.classes = CLASSES + ["background"] if segmentation else list(CLASSES)
        self.ignore_index = None
        self._labels = read_idx(self._lbl_path, LABEL_MAGIC)
        if self._labels.shape != (self._n,) or int(self._labels.max()) >= len(CLASSES):
            raise VisaeError(
                f"corrupt idx file {self._lbl_path}: expected {self._n} labels in 0..9, "
                f"got shape {self._labels.shape}, max {int(self._labels.max())}"
            )
        self._images: np.ndarray | None = None  # decompressed on first access (~0.3 s for train)

    def __len__(self) -> int:
        return self._n

    def images(self) -> np.ndarray:
        """All images as (N, 28, 28) uint8 (for fast batch paths that skip PIL)."""
        if self._images is None:
            arr = read_idx(self._img_path, IMAGE_MAGIC)
            if arr.shape != (self._n, 28, 28):
                raise VisaeError(f"corrupt idx file {self._img_path}: shape {arr.shape}, expected ({self._n}, 28, 28)")
            self._images = arr
        return self._images

    def _load(self, i: int) -> Sample:
        gray = self.images()[i]
        label = int(self._labels[i])
        mask = None
        if self.segmentation:
            mask = np.where(gray > self.threshold, label, BACKGROUND).astype(np.int64)
        return Sample(image=Image.fromarray(gray, "L").convert("RGB"), label=label, mask=mask)

    def label_array(self) -> np.ndarray:
        return self._labels.astype(np.int64)


def open_fashion_mnist(root: Path, split: str | None, opts: dict, spec: dict) -> ImageDataset:
    require_dir(root, "Fashion-MNIST folder")
    split = spec["split"] = split or "train"
    if split not in SPLITS:
        raise VisaeError(f"fashion-mnist split must be 'train' or 'test'; got split: {split!r}")
    seg = opts.get("segmentation", False)
    if not isinstance(seg, bool):
        raise VisaeError(f"fashion-mnist option segmentation must be true or false; got {seg!r}")
    thr = opts.get("threshold", 0)
    if isinstance(thr, bool) or not isinstance(thr, int) or not 0 <= thr <= 254:
        raise VisaeError(f"fashion-mnist option threshold must be an integer in 0..254; got {thr!r}")
    return FashionMNIST(root, split, seg, thr, spec)


# --- fetch -----------------------------------------------------------------------------------


def _md5(path: Path, gunzip: bool = False) -> str:
    h = hashlib.md5()
    with (gzip.open(path) if gunzip else open(path, "rb")) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, name: str | None = None) -> bool:
    """True if `path` is the official file `name` (its .gz MD5, or its decompressed MD5)."""
    gz_md5, raw_md5 = FILES[name or path.name]
    if _md5(path) == gz_md5:
        return True
    try:
        return _md5(path, gunzip=True) == raw_md5
    except (OSError, EOFError, zlib.error):
        return False


class _BadSum(Exception):
    pass


def _install(dest: Path, fill) -> str | None:
    """Write `dest` atomically via `fill(tmp)`, keeping it only if its MD5 checks; None = ok."""
    try:
        with atomic_path(dest) as tmp:
            fill(tmp)
            if not verify_file(tmp, dest.name):
                raise _BadSum
    except _BadSum:
        return "MD5 mismatch"
    except (OSError, ValueError, http.client.HTTPException) as err:
        return str(err) or type(err).__name__
    return None


def _download(url: str, tmp: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)


def fetch_fashion_mnist(out_dir: Path, source: Path | None = None, url: str | None = None) -> Path:
    """Put the four verified files in `out_dir`: keep good ones, else copy from `source`
    (default Debian's folder), else download from `url` (default the official release)."""
    out_dir = Path(out_dir)
    clean_stale_temps(out_dir)  # a killed fetch's half-copied files
    src = Path(source) if source is not None else DEBIAN_DIR
    base = (url or OFFICIAL_URL).rstrip("/") + "/"
    for name in FILES:
        dest = out_dir / name
        if dest.is_file() and verify_file(dest):
            continue
        have = src / name
        if have.is_file():
            why_src = _install(dest, lambda tmp: shutil.copyfile(have, tmp))
            if why_src is None:
                continue
            why_src = f"{have}: {why_src}"
        else:
            why_src = f"{have} missing"
        why_dl = _install(dest, lambda tmp: _download(base + name, tmp))
        if why_dl is None:
            continue
        raise VisaeError(
            f"Fashion-MNIST not found at {src} ({why_src}) and download failed ({base + name}: {why_dl}): "
            f"apt-get install dataset-fashion-mnist or put the official {name} in {out_dir}"
        )
    return out_dir

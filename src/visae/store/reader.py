"""Reading a store: memory-mapped shards, verification, and shuffled token batches.

The loader (`TokenLoader`) draws each batch from a window of images visited in a seeded random
order, gathered straight from the memory-mapped shards; see its docstring.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from visae.errors import VisaeError
from visae.store.format import (FORMAT, META_DIGEST, STORE_DTYPES, from_storage, meta_digest, sha256_file,
                                shard_name)


class ActivationStore:
    """A finished store directory. Opening checks meta.json (its keys, types and own digest) and
    that every shard is present and full-sized; `verify=True` (what train and evaluate use) also
    re-hashes every file, so a tampered shard is refused and `store_hash` comes from the data."""

    def __init__(self, root: str | Path, verify: bool = False):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        if not self.meta["complete"]:
            raise VisaeError(f"store {self.root} is incomplete ({len(self.meta['shards'])} of "
                             f"{self.meta['n_shards']} shards): rerun `visae extract` to finish it")
        self._file_hashes = None
        if verify:
            problems, self._file_hashes = _file_problems(self.root, self.meta)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise VisaeError(f"store {self.root}: {problems[0]}{more}: run `visae verify {self.root}`, "
                                 f"then rerun `visae extract` into a fresh folder")
        self.dtype_name: str = self.meta["dtype"]
        self.dtype: torch.dtype = STORE_DTYPES[self.dtype_name][1]
        self.d_model: int = int(self.meta["d_model"])
        self.tokens_per_image: int = int(self.meta["layout"]["n_tokens"])
        self.n_images: int = int(self.meta["n_images"])
        self.n_tokens: int = self.n_images * self.tokens_per_image
        self.shard_images: int = int(self.meta["shard_images"])
        self._acts = [self._open(shard_name("acts", s["index"]),
                                 (s["stop"] - s["start"], self.tokens_per_image, self.d_model))
                      for s in self.meta["shards"]]
        self._tensors: list[torch.Tensor] | None = None
        self.labels = np.concatenate([self._load_small(shard_name("labels", s["index"]))
                                      for s in self.meta["shards"]])
        has_patch = any(shard_name("patch_labels", 0) == n for n in self.meta["shards"][0]["files"])
        self.patch_labels = (np.concatenate([self._load_small(shard_name("patch_labels", s["index"]))
                                             for s in self.meta["shards"]]) if has_patch else None)

    def _load_small(self, name: str) -> np.ndarray:
        try:
            return np.load(self.root / name)
        except (ValueError, OSError) as err:
            raise VisaeError(f"shard {self.root / name} is missing, truncated or corrupt ({err}): "
                             f"run `visae verify {self.root}`") from None

    def _open(self, name: str, shape: tuple) -> np.ndarray:
        path = self.root / name
        if not path.is_file():
            raise VisaeError(f"shard {path} is missing")
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise VisaeError(f"shard {path} is truncated or corrupt ({err}): run `visae verify {self.root}`") from None
        if array.shape != shape or array.dtype != STORE_DTYPES[self.dtype_name][0]:
            raise VisaeError(f"shard {path} has shape {array.shape} {array.dtype}, expected {shape} "
                             f"{np.dtype(STORE_DTYPES[self.dtype_name][0])}")
        return array

    @property
    def shard_arrays(self) -> list[np.ndarray]:
        return self._acts

    @property
    def shard_tensors(self) -> list[torch.Tensor]:
        """Each shard as a read-only [images*tokens, d] torch view of its memory map (bf16 as
        int16 bits). Never written to; torch just has no read-only tensors."""
        if self._tensors is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._tensors = [torch.from_numpy(
                    (a.view(np.int16) if self.dtype_name == "bfloat16" else np.asarray(a)).reshape(-1, self.d_model))
                    for a in self._acts]
        return self._tensors

    @property
    def layout(self) -> dict:
        return self.meta["layout"]

    @property
    def store_hash(self) -> str:
        """Identity of the data: a sha256 over every file's sha256, as re-hashed from the files
        when opened with verify=True (else as recorded in the digest-checked meta.json)."""
        hashes = self._file_hashes or {n: sha for s in self.meta["shards"] for n, sha in s["files"].items()}
        h = hashlib.sha256()
        for shard in self.meta["shards"]:
            for name in sorted(shard["files"]):
                h.update(f"{name}:{hashes[name]}\n".encode())
        return h.hexdigest()

    def images(self, start: int, stop: int) -> torch.Tensor:
        """Activations of images [start, stop) as a [n, tokens, d] tensor in the store dtype."""
        parts = []
        for shard, array in zip(self.meta["shards"], self._acts):
            lo, hi = max(start, shard["start"]), min(stop, shard["stop"])
            if lo < hi:
                parts.append(from_storage(np.array(array[lo - shard["start"]:hi - shard["start"]]),
                                          self.dtype_name))
        if not parts:
            return torch.empty(0, self.tokens_per_image, self.d_model, dtype=self.dtype)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def token_index(self, kind: str | None) -> np.ndarray:
        """Positions (within an image's stored tokens) of 'cls', 'registers', 'patches' or all."""
        lay = self.layout
        n_cls, n_reg, n_tok = lay["n_cls"], lay["n_registers"], lay["n_tokens"]
        stored = lay["stored"]  # which token groups were written
        start = {"cls": 0}
        offset = n_cls if "cls" in stored else 0
        start["registers"] = offset
        offset += n_reg if "registers" in stored else 0
        start["patches"] = offset
        if kind in (None, "all"):
            return np.arange(n_tok)
        if kind not in ("cls", "registers", "patches"):
            raise VisaeError(f"unknown token kind {kind!r}: use cls, registers, patches or all")
        if kind not in stored:
            raise VisaeError(f"store {self.root} has no {kind} tokens (it holds {', '.join(stored)})")
        size = {"cls": n_cls, "registers": n_reg, "patches": lay["grid"][0] * lay["grid"][1]}[kind]
        return np.arange(start[kind], start[kind] + size)

    def verify(self) -> list[str]:
        """Re-hash every file; return one line per problem (empty when the store is intact)."""
        return _file_problems(self.root, self.meta)[0]


def _fail(path: Path, msg: str):
    raise VisaeError(f"{path} {msg}: rerun `visae extract` into a fresh folder")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Required keys of meta.json and a check of each value's type.
_META_KEYS = {
    "format": lambda v: v == FORMAT, "complete": lambda v: isinstance(v, bool),
    "dtype": lambda v: v in STORE_DTYPES, "d_model": lambda v: _is_int(v) and v > 0,
    "layout": lambda v: isinstance(v, dict), "n_images": lambda v: _is_int(v) and v > 0,
    "shard_images": lambda v: _is_int(v) and v > 0, "n_shards": lambda v: _is_int(v) and v > 0,
    "shards": lambda v: isinstance(v, list), "job": lambda v: isinstance(v, dict),
    META_DIGEST: lambda v: isinstance(v, str),
}
_LAYOUT_KEYS = {"n_tokens": lambda v: _is_int(v) and v > 0, "n_cls": lambda v: _is_int(v) and v >= 0,
                "n_registers": lambda v: _is_int(v) and v >= 0, "stored": lambda v: isinstance(v, list),
                "grid": lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(g) and g > 0 for g in v)}


def read_meta(root: str | Path) -> dict:
    """meta.json of a store, checked: valid JSON, every required key with the right type, its own
    digest, and shard ranges that tile the images. Every problem is one line naming the key."""
    root = Path(root)
    path = root / "meta.json"
    if not root.is_dir():
        raise VisaeError(f"activation store {root} does not exist")
    if not path.is_file():
        raise VisaeError(f"{root} is not an activation store (no meta.json)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        _fail(path, f"is not valid JSON ({err})")
    if not isinstance(meta, dict):
        _fail(path, f"must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        _fail(path, f"has format {meta.get('format')!r}, expected {FORMAT!r}")
    for keys, where, obj in ((_META_KEYS, "", meta), (_LAYOUT_KEYS, "layout.", meta.get("layout"))):
        if not isinstance(obj, dict):
            break
        for key, ok in keys.items():
            if key not in obj:
                _fail(path, f"lacks key {where + key!r}")
            if not ok(obj[key]):
                _fail(path, f"has a bad value for key {where + key!r}: {obj[key]!r}")
    _check_shards(path, meta)
    if meta[META_DIGEST] != meta_digest(meta):
        _fail(path, f"does not match its {META_DIGEST} (edited or damaged)")
    return meta


def _check_shards(path: Path, meta: dict) -> None:
    """Shard i covers images [i*S, min((i+1)*S, n)); a complete store has all of them."""
    S, n = meta["shard_images"], meta["n_images"]
    if meta["n_shards"] != -(-n // S) or meta["job"].get("n_images", n) != n:
        _fail(path, f"has inconsistent counts (n_images {n}, shard_images {S}, n_shards {meta['n_shards']})")
    for i, shard in enumerate(meta["shards"]):
        ok = (isinstance(shard, dict) and shard.get("index") == i and shard.get("start") == i * S
              and shard.get("stop") == min((i + 1) * S, n) and isinstance(shard.get("files"), dict)
              and shard["files"] and all(isinstance(v, str) for v in shard["files"].values()))
        if not ok:
            _fail(path, f"has a malformed entry shards[{i}]")
    if meta["complete"] and len(meta["shards"]) != meta["n_shards"]:
        _fail(path, f"says complete but lists {len(meta['shards'])} of {meta['n_shards']} shards")


def verify_store(root: str | Path) -> list[str]:
    """Problems found in a store, each naming the file; a malformed meta.json raises VisaeError."""
    root = Path(root)
    meta = read_meta(root)
    problems = []
    if not meta["complete"]:
        problems.append(f"incomplete: {len(meta['shards'])} of {meta['n_shards']} shards")
    return problems + _file_problems(root, meta)[0]


def _file_problems(root: Path, meta: dict) -> tuple[list[str], dict[str, str]]:
    """(one line per missing or mismatching file, each file's sha256 as re-hashed now)."""
    expected = {name: sha for shard in meta["shards"] for name, sha in sorted(shard["files"].items())}
    present = [name for name in expected if (root / name).is_file()]
    # hashlib releases the GIL: one thread per core hashes that many shards at once
    with ThreadPoolExecutor(max_workers=max(1, min(len(present), os.cpu_count() or 1))) as pool:
        hashes = dict(zip(present, pool.map(lambda name: sha256_file(root / name), present)))
    problems = [f"{name}: missing" if name not in hashes else f"{name}: checksum mismatch (truncated or tampered)"
                for name, sha in expected.items() if hashes.get(name) != sha]
    return problems, hashes


class TokenLoader:
    """Shuffled token batches `[batch_size, d_model]` from a store with bounded RAM.

    Each epoch visits the selected images in a seeded random order and cuts that order into
    windows of about `buffer_tokens` tokens; each window's tokens get a random permutation, and
    batch b is positions [b*B, (b+1)*B) of the epoch's stream. A batch therefore comes from
    ~buffer_tokens / tokens_per_image images drawn uniformly from the whole selection (on a
    class-sorted store it covers the classes as a uniform sample would), never from a run of
    consecutive images. A batch is gathered straight from the memory-mapped shards, its rows
    sorted (the order of tokens within a batch does not matter to a loss that sums over them).
    Worker threads gather the next batches while the current one is used, and the kernel is
    asked to read the next window ahead. RAM: the epoch's image order, one window's row table
    and the batches in flight; shard pages live in the page cache. Everything is a function of
    (seed, epoch, window), so a loader resumes exactly from `state_dict()`.

    Args:
        images: indices of the images to draw from (e.g. a train / held-out split), or
        image_range: (start, stop) images to draw from; default every image.
        labels: keep only tokens of images whose label is in this set.
        patch_labels: keep only patch tokens whose patch label is in this set (segmentation stores).
        token_kind: 'patches', 'cls', 'registers' or None for every stored token.
        buffer_tokens: size of the shuffle window in tokens (the window lives in the page cache).
        epochs: number of passes, or None to loop forever.
    """

    def __init__(self, store: ActivationStore, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 images: Iterable[int] | None = None, image_range: tuple[int, int] | None = None,
                 labels: Iterable[int] | None = None, patch_labels: Iterable[int] | None = None,
                 token_kind: str | None = None, buffer_tokens: int = 1 << 20, epochs: int | None = 1,
                 drop_last: bool = True, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 prefetch: bool = True, workers: int = 2):
        if batch_size <= 0:
            raise VisaeError(f"batch_size must be positive, got {batch_size}")
        self.store, self.batch_size, self.seed, self.shuffle = store, int(batch_size), int(seed), shuffle
        self.epochs, self.drop_last, self.dtype, self.device = epochs, drop_last, dtype, device
        self.prefetch, self.workers = prefetch, max(1, int(workers))
        if images is not None:
            self.images = np.unique(np.asarray(list(images) if not isinstance(images, np.ndarray) else images,
                                               dtype=np.int64))
            if not len(self.images) or self.images[0] < 0 or self.images[-1] >= store.n_images:
                raise VisaeError(f"the loader's images must be a non-empty subset of the store's 0..{store.n_images}")
        else:
            start, stop = image_range if image_range is not None else (0, store.n_images)
            if not 0 <= start < stop <= store.n_images:
                raise VisaeError(f"image_range {image_range} is outside the store's 0..{store.n_images}")
            self.images = np.arange(int(start), int(stop), dtype=np.int64)
        self.token_idx = store.token_index(token_kind)
        self.keep = self._keep_mask(labels, patch_labels, token_kind)
        per_image = len(self.token_idx)
        self.buffer_images = max(1, int(buffer_tokens) // per_image)
        counts = (self.keep.sum(axis=1) if self.keep is not None else np.full(store.n_images, per_image))
        self._image_tokens = counts.astype(np.int64)
        self.tokens_per_epoch = int(self._image_tokens[self.images].sum())
        if self.tokens_per_epoch < self.batch_size and drop_last:
            raise VisaeError(f"only {self.tokens_per_epoch} tokens match, fewer than one batch of {batch_size}")
        # first flat row ([images*tokens, d] numbering over the whole store) of each shard, and the end
        per = store.tokens_per_image
        self._shard_rows = np.array([s["start"] * per for s in store.meta["shards"]]
                                    + [store.meta["shards"][-1]["stop"] * per], dtype=np.int64)
        self.epoch, self.batch_in_epoch = 0, 0

    # -- selection -------------------------------------------------------------------------
    def _keep_mask(self, labels, patch_labels, token_kind) -> np.ndarray | None:
        """Boolean [n_images, selected tokens] of tokens to serve, or None for all of them."""
        if labels is None and patch_labels is None:
            return None
        n = self.store.n_images
        keep = np.ones((n, len(self.token_idx)), dtype=bool)
        if labels is not None:
            keep &= np.isin(self.store.labels, list(labels))[:, None]
        if patch_labels is not None:
            if self.store.patch_labels is None:
                raise VisaeError(f"store {self.store.root} has no patch labels to filter on")
            if token_kind != "patches":
                raise VisaeError("filtering by patch label needs token_kind='patches'")
            keep &= np.isin(self.store.patch_labels, list(patch_labels))
        return keep

    def _rows(self, images: np.ndarray) -> np.ndarray:
        """The flat store rows of the served tokens of `images`, image by image."""
        rows = images[:, None] * self.store.tokens_per_image + self.token_idx[None, :]
        return (rows[self.keep[images]] if self.keep is not None else rows).reshape(-1)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise VisaeError(f"loader state has seed {state['seed']}, this loader has {self.seed}")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    # -- reading ---------------------------------------------------------------------------
    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        """The tokens at flat store rows `rows` (any order), as one batch with its rows sorted.

        torch.index_select into the batch tensor, one call per shard touched: one pass,
        multi-threaded, ~3x numpy's fancy indexing on fp16 rows."""
        rows = np.sort(rows)
        shards = self.store.shard_tensors
        out = torch.empty((len(rows), self.store.d_model), dtype=shards[0].dtype)
        bounds = np.searchsorted(rows, self._shard_rows)
        for s in range(len(shards)):
            a, b = bounds[s], bounds[s + 1]
            if a < b:
                torch.index_select(shards[s], 0, torch.from_numpy(rows[a:b] - self._shard_rows[s]), out=out[a:b])
        data = out.view(torch.bfloat16) if self.store.dtype_name == "bfloat16" else out
        return data if data.dtype == self.dtype else data.to(self.dtype)

    def _readahead(self, images: np.ndarray) -> None:
        """Ask the kernel to start reading a window's images (helps a cold page cache)."""
        arrays, per_row = self.store.shard_arrays, self.store.tokens_per_image * self.store.d_model
        starts = np.array([s["start"] for s in self.store.meta["shards"]])
        page = mmap.PAGESIZE
        for img, shard in zip(images.tolist(), (np.searchsorted(starts, images, side="right") - 1).tolist()):
            mm = getattr(arrays[shard], "_mmap", None)
            if mm is None or not hasattr(mm, "madvise"):
                return
            start = arrays[shard].offset + (img - starts[shard]) * per_row * arrays[shard].itemsize
            aligned = start // page * page
            try:
                mm.madvise(mmap.MADV_WILLNEED, aligned, start - aligned + per_row * arrays[shard].itemsize)
            except (OSError, ValueError):
                return

    def sample(self, n: int, seed: int, chunk: int = 1 << 16) -> Iterator[torch.Tensor]:
        """`n` tokens drawn uniformly without replacement from the loader's whole selection (all
        of them when n >= tokens_per_epoch), in chunks: for normalisation constants that do not
        depend on how the batches are cut. A function of (n, seed): iterate it again for the
        same tokens."""
        total = self.tokens_per_epoch
        pick = (np.sort(np.random.default_rng(int(seed)).choice(total, int(n), replace=False))
                if n < total else np.arange(total))
        counts = self._image_tokens[self.images]
        ends = np.cumsum(counts)
        for lo in range(0, len(pick), chunk):
            p = pick[lo:lo + chunk]
            at = np.searchsorted(ends, p, side="right")  # position of each token's image in self.images
            local = p - (ends[at] - counts[at])  # its rank among that image's served tokens
            images = self.images[at]
            if self.keep is not None:  # rank -> position among the image's selected tokens
                local = np.argmax(np.cumsum(self.keep[images], axis=1) > local[:, None], axis=1)
            yield self._gather(images * self.store.tokens_per_image + self.token_idx[local]).to(self.device)

    # -- iteration -------------------------------------------------------------------------
    def _epoch_jobs(self, epoch: int, skip_batches: int):
        """Yield the flat store rows of each batch of an epoch, from batch `skip_batches` on."""
        rng = np.random.default_rng([self.seed, epoch])
        order = self.images[rng.permutation(len(self.images))] if self.shuffle else self.images
        windows = [np.sort(order[i:i + self.buffer_images]) for i in range(0, len(order), self.buffer_images)]
        sizes = np.array([self._image_tokens[w].sum() for w in windows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        B, total = self.batch_size, int(offsets[-1])
        n_batches = total // B + (1 if total % B and not self.drop_last else 0)
        cache: dict[int, tuple] = {}

        def window(w: int):
            """(rows, permutation) of window w; the permutation is seeded by (seed, epoch, w)."""
            if w not in cache:
                cache.clear()
                perm = (np.random.default_rng([self.seed, epoch, w]).permutation(int(sizes[w]))
                        if self.shuffle else None)
                cache[w] = (self._rows(windows[w]), perm)
                if w + 1 < len(windows):
                    self._readahead(windows[w + 1])
            return cache[w]

        for b in range(skip_batches, n_batches):
            lo, hi = b * B, min((b + 1) * B, total)
            parts = []
            w = int(np.searchsorted(offsets, lo, side="right") - 1)
            while lo < hi:
                end = min(hi, int(offsets[w + 1]))
                rows, perm = window(w)
                a, z = lo - offsets[w], end - offsets[w]
                parts.append(rows[a:z] if perm is None else rows[perm[a:z]])
                lo, w = end, w + 1
            yield np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _epoch_batches(self, epoch: int, skip_batches: int) -> Iterator[torch.Tensor]:
        jobs = self._epoch_jobs(epoch, skip_batches)
        if not self.prefetch:
            for rows in jobs:
                yield self._gather(rows)
            return
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="visae-loader") as pool:
            futures: deque = deque(pool.submit(self._gather, r) for r in islice(jobs, 2 * self.workers))
            try:
                while futures:
                    batch = futures.popleft().result()
                    futures.extend(pool.submit(self._gather, r) for r in islice(jobs, 1))
                    yield batch
            finally:
                for future in futures:
                    future.cancel()

    def __iter__(self) -> Iterator[torch.Tensor]:
        while self.epochs is None or self.epoch < self.epochs:
            for batch in self._epoch_batches(self.epoch, self.batch_in_epoch):
                self.batch_in_epoch += 1
                yield batch.to(self.device, non_blocking=True)
            self.epoch += 1
            self.batch_in_epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.tokens_per_epoch, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

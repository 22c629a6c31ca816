"""Reading a store: its checked meta.json, memory-mapped shards, and verification of every file.

The shuffled token batches drawn from a store are visae.store.loader's `TokenLoader`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from visae.errors import VisaeError
from visae.layout import Identity
from visae.store.format import STORE_DTYPES, from_storage, sha256_file, shard_name
from visae.store.meta import TOKEN_GROUPS, StoreLayout, StoreMeta


class ActivationStore:
    """A finished store directory. Opening checks meta.json (its keys, types and own digest) and
    that every shard is present and full-sized; `verify=True` (what train and evaluate use) also
    re-hashes every file, so a tampered shard is refused and `store_hash` comes from the data."""

    def __init__(self, root: str | Path, verify: bool = False):
        self.root = Path(root)
        self.info = StoreMeta.load(self.root)
        if not self.info.complete:
            raise VisaeError(f"store {self.root} is incomplete ({len(self.info.shards)} of "
                             f"{self.info.n_shards} shards): rerun `visae extract` to finish it")
        self._file_hashes = None
        if verify:
            problems, self._file_hashes = _file_problems(self.root, self.info)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise VisaeError(f"store {self.root}: {problems[0]}{more}: run `visae verify {self.root}`, "
                                 f"then rerun `visae extract` into a fresh folder")
        self.dtype_name: str = self.info.dtype
        self.dtype: torch.dtype = STORE_DTYPES[self.dtype_name][1]
        self.d_model: int = self.info.d_model
        self.tokens_per_image: int = self.info.layout.n_tokens
        self.n_images: int = self.info.n_images
        self.n_tokens: int = self.n_images * self.tokens_per_image
        self.shard_images: int = self.info.shard_images
        self._acts = [self._open(shard_name("acts", s["index"]),
                                 (s["stop"] - s["start"], self.tokens_per_image, self.d_model))
                      for s in self.info.shards]
        self._tensors: list[torch.Tensor] | None = None
        self.labels = np.concatenate([self._load_small(shard_name("labels", s["index"]))
                                      for s in self.info.shards])
        has_patch = any(shard_name("patch_labels", 0) == n for n in self.info.shards[0]["files"])
        self.patch_labels = (np.concatenate([self._load_small(shard_name("patch_labels", s["index"]))
                                             for s in self.info.shards]) if has_patch else None)

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
    def layout(self) -> StoreLayout:
        return self.info.layout

    @property
    def store_hash(self) -> str:
        """Identity of the data: a sha256 over every file's sha256, as re-hashed from the files
        when opened with verify=True (else as recorded in the digest-checked meta.json)."""
        hashes = self._file_hashes or {n: sha for s in self.info.shards for n, sha in s["files"].items()}
        h = hashlib.sha256()
        for shard in self.info.shards:
            for name in sorted(shard["files"]):
                h.update(f"{name}:{hashes[name]}\n".encode())
        return h.hexdigest()


    def identity(self, sae: str) -> Identity:
        """What a result of `sae` on this store is about (model, dataset, layer, SAE, store hash)."""
        return Identity.of(self.info.model, self.info.dataset, self.info.layer, sae, self.store_hash)
    def images(self, start: int, stop: int) -> torch.Tensor:
        """Activations of images [start, stop) as a [n, tokens, d] tensor in the store dtype."""
        parts = []
        for shard, array in zip(self.info.shards, self._acts):
            lo, hi = max(start, shard["start"]), min(stop, shard["stop"])
            if lo < hi:
                parts.append(from_storage(np.array(array[lo - shard["start"]:hi - shard["start"]]),
                                          self.dtype_name))
        if not parts:
            return torch.empty(0, self.tokens_per_image, self.d_model, dtype=self.dtype)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def take(self, images, tokens: np.ndarray | None = None) -> torch.Tensor:
        """The tokens at positions `tokens` (default all) of the given images, as a
        [len(images), len(tokens), d] tensor in the store dtype: one index_select per shard."""
        images = np.asarray(images, dtype=np.int64)
        tokens = np.arange(self.tokens_per_image) if tokens is None else np.asarray(tokens, dtype=np.int64)
        if len(images) and (images.min() < 0 or images.max() >= self.n_images):
            raise VisaeError(f"store {self.root} has images 0..{self.n_images - 1}; asked for {images.min()}..{images.max()}")
        rows = (images[:, None] * self.tokens_per_image + tokens[None, :]).reshape(-1)
        out = torch.empty((len(rows), self.d_model), dtype=self.shard_tensors[0].dtype)
        starts = np.array([s["start"] * self.tokens_per_image for s in self.info.shards] + [self.n_tokens])
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            at = np.flatnonzero(shard_of == s)
            out[torch.from_numpy(at)] = torch.index_select(self.shard_tensors[s], 0, torch.from_numpy(rows[at] - starts[s]))
        data = out.view(torch.bfloat16) if self.dtype_name == "bfloat16" else out
        return data.view(len(images), len(tokens), self.d_model)

    def token_index(self, kind: str | None) -> np.ndarray:
        """Positions (within an image's stored tokens) of 'cls', 'registers', 'patches' or all."""
        lay = self.layout
        if kind in (None, "all"):
            return np.arange(lay.n_tokens)
        if kind not in TOKEN_GROUPS:
            raise VisaeError(f"unknown token kind {kind!r}: use cls, registers, patches or all")
        if kind not in lay.stored:
            raise VisaeError(f"store {self.root} has no {kind} tokens (it holds {', '.join(lay.stored)})")
        return np.arange(lay.start(kind), lay.start(kind) + lay.size(kind))

    def verify(self) -> list[str]:
        """Re-hash every file; return one line per problem (empty when the store is intact)."""
        return _file_problems(self.root, self.info)[0]


def verify_store(root: str | Path) -> list[str]:
    """Problems found in a store, each naming the file; a malformed meta.json raises VisaeError."""
    root = Path(root)
    meta = StoreMeta.load(root)
    problems = []
    if not meta.complete:
        problems.append(f"incomplete: {len(meta.shards)} of {meta.n_shards} shards")
    return problems + _file_problems(root, meta)[0]


def _file_problems(root: Path, meta: StoreMeta) -> tuple[list[str], dict[str, str]]:
    """(one line per missing or mismatching file, each file's sha256 as re-hashed now)."""
    expected = {name: sha for shard in meta.shards for name, sha in sorted(shard["files"].items())}
    present = [name for name in expected if (root / name).is_file()]
    # hashlib releases the GIL: one thread per core hashes that many shards at once
    with ThreadPoolExecutor(max_workers=max(1, min(len(present), os.cpu_count() or 1))) as pool:
        hashes = dict(zip(present, pool.map(lambda name: sha256_file(root / name), present)))
    problems = [f"{name}: missing" if name not in hashes else f"{name}: checksum mismatch (truncated or tampered)"
                for name, sha in expected.items() if hashes.get(name) != sha]
    return problems, hashes

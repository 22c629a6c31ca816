"""Shuffled token batches from a store, with bounded RAM.

`TokenLoader` draws each batch from a window of images visited in a seeded random order,
gathered straight from the memory-mapped shards; see its docstring.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from itertools import islice
from typing import Iterable, Iterator

import numpy as np
import torch

from visae.errors import VisaeError
from visae.store.reader import ActivationStore


def default_workers() -> int:
    """Gathering threads: half the CPUs this process may use (the rest run the consumer and
    the intra-op threads), at least 2, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 2
    return max(2, min(16, cpus // 2))


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
        dtype, device: the batches' dtype and device. A batch for a device other than the CPU
            travels in the store's dtype (pinned and non-blocking to CUDA) and is converted there.
        workers: gathering threads (default `default_workers()`); prefetch=False gathers in
            the consumer's thread instead.
    """

    def __init__(self, store: ActivationStore, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 images: Iterable[int] | None = None, image_range: tuple[int, int] | None = None,
                 labels: Iterable[int] | None = None, patch_labels: Iterable[int] | None = None,
                 token_kind: str | None = None, buffer_tokens: int = 1 << 20, epochs: int | None = 1,
                 drop_last: bool = True, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 prefetch: bool = True, workers: int | None = None):
        if batch_size <= 0:
            raise VisaeError(f"batch_size must be positive, got {batch_size}")
        self.store, self.batch_size, self.seed, self.shuffle = store, int(batch_size), int(seed), shuffle
        self.epochs, self.drop_last, self.dtype, self.device = epochs, drop_last, dtype, device
        self.prefetch, self.workers = prefetch, max(1, int(workers if workers is not None else default_workers()))
        # A batch for another device travels in the store's dtype and is converted there.
        self.convert_on_device = torch.device(device).type != "cpu"
        self.pin = torch.device(device).type == "cuda"  # pinned host batches, copied non-blocking
        self._copy_stream = None
        self._staging = threading.local()  # per worker: the gather buffer of a batch converted on the host
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
        self._shard_rows = np.array([s["start"] * per for s in store.info.shards]
                                    + [store.info.shards[-1]["stop"] * per], dtype=np.int64)
        # each shard as a 2-D numpy view [rows, d] of its memory map (bf16 as int16), for np.take
        self._flat = [t.numpy() for t in store.shard_tensors]
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
    def _host_batch(self, n: int) -> torch.Tensor:
        """An empty host batch of n rows: in the loader's dtype, or in the store's own (bf16 as
        int16 bits; pinned for CUDA) when `convert_on_device`. Allocated by the consumer's
        thread, whose heap reuses the memory of the batches it dropped: a worker thread's
        heap gives its memory back, and faulting fresh pages in cost ~4 ms per 6 MB batch on
        the 2-core reference machine (more than gathering it)."""
        if self.convert_on_device:
            return torch.empty((n, self.store.d_model), dtype=self.store.shard_tensors[0].dtype, pin_memory=self.pin)
        return torch.empty((n, self.store.d_model), dtype=self.dtype)

    def _gather(self, rows: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens at flat store rows `rows` (any order), rows sorted, into `out` (from
        `_host_batch`).

        Given `out`, the call runs in a worker thread: one np.take per shard touched, a serial
        row copy that releases the GIL, so the workers gather side by side rather than each
        starting a team of intra-op threads (oversubscribed, those stall a busy machine); a
        batch converted on the host is gathered into the worker's own staging buffer first.
        Without, it runs in the consumer's thread: torch.index_select, multi-threaded."""
        rows = np.sort(rows)
        threaded, storage = out is not None, self.store.shard_tensors[0].dtype
        out = self._host_batch(len(rows)) if out is None else out
        if out.dtype in (storage, self.store.dtype):  # the stored bits, as they are
            raw = out.view(storage)
        elif threaded:
            raw = getattr(self._staging, "buf", None)
            if raw is None or raw.shape[0] < len(rows):
                raw = self._staging.buf = torch.empty(out.shape, dtype=storage)
            raw = raw[:len(rows)]
        else:
            raw = torch.empty(out.shape, dtype=storage)
        bounds = np.searchsorted(rows, self._shard_rows)
        for s in range(len(self._shard_rows) - 1):
            a, b = bounds[s], bounds[s + 1]
            if a < b:
                local = rows[a:b] - self._shard_rows[s]
                if threaded:  # rows are in range by construction; mode="raise" would buffer `out`
                    np.take(self._flat[s], local, axis=0, out=raw[a:b].numpy(), mode="clip")
                else:
                    torch.index_select(self.store.shard_tensors[s], 0, torch.from_numpy(local), out=raw[a:b])
        if raw.data_ptr() != out.data_ptr():
            out.copy_(self._typed(raw))
        return out

    def _typed(self, x: torch.Tensor) -> torch.Tensor:
        """Stored bits as the store's dtype (bf16 is held as int16)."""
        return x.view(torch.bfloat16) if self.store.dtype_name == "bfloat16" else x

    def _deliver(self, host: torch.Tensor) -> torch.Tensor:
        """A gathered batch on the loader's device in its dtype. With `convert_on_device` it
        travels in the store's dtype (half the bytes of fp32) and is converted there; to CUDA
        it is copied non-blocking from pinned memory on a side stream, so the copy overlaps
        the compute already queued, and the consumer's stream waits for it."""
        if not self.convert_on_device:
            return host.to(self.device)
        stream = self._copy_stream
        if self.pin and stream is None:
            stream = self._copy_stream = torch.cuda.Stream(torch.device(self.device))
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            x = self._typed(host.to(self.device, non_blocking=self.pin)).to(self.dtype)
        if stream is not None:
            current = torch.cuda.current_stream(x.device)
            current.wait_stream(stream)
            x.record_stream(current)  # allocated on the side stream, used on the consumer's
        return x

    def _readahead(self, images: np.ndarray) -> None:
        """Ask the kernel to start reading a window's images (helps a cold page cache)."""
        arrays, per_row = self.store.shard_arrays, self.store.tokens_per_image * self.store.d_model
        starts = np.array([s["start"] for s in self.store.info.shards])
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
            yield self._deliver(self._gather(images * self.store.tokens_per_image + self.token_idx[local]))

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

    def _jobs(self):
        """(epoch, batch, rows) of every batch from the loader's state on, across epochs."""
        epoch, skip = self.epoch, self.batch_in_epoch
        while self.epochs is None or epoch < self.epochs:
            for b, rows in enumerate(self._epoch_jobs(epoch, skip), start=skip):
                yield epoch, b, rows
            epoch, skip = epoch + 1, 0

    def _batches(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(epoch, batch, host batch), gathered ahead by one pool of workers that lives across
        epochs, so an epoch's end does not drain the pipeline (many epochs of a small store)."""
        jobs = self._jobs()
        if not self.prefetch:
            for epoch, b, rows in jobs:
                yield epoch, b, self._gather(rows)
            return
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="visae-loader") as pool:
            def submit(n):
                return ((e, b, pool.submit(self._gather, rows, self._host_batch(len(rows))))
                        for e, b, rows in islice(jobs, n))
            futures: deque = deque(submit(2 * self.workers))
            try:
                while futures:
                    epoch, b, future = futures.popleft()
                    batch = future.result()
                    futures.extend(submit(1))
                    yield epoch, b, batch
            finally:
                for *_, future in futures:
                    future.cancel()

    def __iter__(self) -> Iterator[torch.Tensor]:
        for epoch, b, batch in self._batches():
            self.epoch, self.batch_in_epoch = epoch, b + 1
            yield self._deliver(batch)
        self.epoch, self.batch_in_epoch = self.epochs, 0  # reached only when epochs is finite

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.tokens_per_epoch, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

"""Writing a store: atomic shards, a checksum per file, and resume after a kill.

Shard i always holds images [i*S, (i+1)*S), so a rerun recomputes exactly the missing shards
with the same batches and produces byte-identical files on CPU.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from visae.atomic import clean_stale_temps
from visae.errors import VisaeError
from visae.store.format import FORMAT, sha256_file, shard_name
from visae.store.meta import StoreMeta


def _write_npy(path: Path, array: np.ndarray) -> str:
    """Write `array` as .npy atomically (tmp + fsync + rename); return the file's sha256."""
    array = np.ascontiguousarray(array)
    tmp = path.with_name(f".{path.name}.tmp")
    h = hashlib.sha256()
    with open(tmp, "wb") as fh:
        header = _npy_header(array)
        h.update(header)
        fh.write(header)
        body = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
        h.update(body)
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return h.hexdigest()


def _npy_header(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(array))
    return buf.getvalue()


def identity_difference(made_by: dict | None, now: dict | None) -> str:
    """Why two model identities (meta.json's model.identity) differ, in a few words."""
    if not isinstance(made_by, dict):
        return "the store records no model identity"
    if not isinstance(now, dict):
        return "the new model has no recorded identity"
    return _different(made_by, now)


def _different(old: dict, new: dict) -> str:
    """The keys whose values two dicts disagree on, e.g. "different precision"."""
    return "different " + ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))


class StoreWriter:
    """Writes one store directory. `meta` is what its maker says (StoreWriter fills in the shards);
    `job` identifies the settings, and a resume must match it."""

    def __init__(self, root: str | os.PathLike, meta: StoreMeta, job: dict, shard_images: int, n_images: int):
        self.root = Path(root)
        self.meta = meta
        self.job = job
        self.shard_images = int(shard_images)
        self.n_images = int(n_images)
        self.n_shards = -(-self.n_images // self.shard_images)
        self.shards: list[dict] = []

    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    def open(self) -> int:
        """Prepare the directory; return how many leading shards are already done and verified."""
        self.root.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.root)
        done: list[dict] = []
        if self.meta_path.exists():
            old = StoreMeta.load(self.root)  # checked and sealed: an edited or damaged one is refused by name
            made_by, now = old.model_identity, self.meta.model_identity
            if made_by != now:
                raise VisaeError(f"{self.root} holds a store made by another model "
                                 f"({identity_difference(made_by, now)}): remove it or choose another output folder")
            if old.job != self.job:
                raise VisaeError(f"{self.root} holds a store made with other settings "
                                 f"({_different(old.job, self.job)}): remove it or choose another output folder")
            for shard in old.shards:
                ok = all((self.root / name).is_file() and sha256_file(self.root / name) == sha
                         for name, sha in shard["files"].items())
                if not ok or shard["index"] != len(done):
                    break
                done.append(shard)
        keep = {name for shard in done for name in shard["files"]}
        for path in self.root.glob("*.npy"):
            if path.name not in keep:
                path.unlink()
        self.shards = done
        self._write_meta(complete=len(done) == self.n_shards)
        return len(done)

    def remove(self) -> None:
        """Delete this store (one that can never be completed): meta.json first, so that nothing
        left behind looks like a store."""
        self.meta_path.unlink(missing_ok=True)
        for shard in self.shards:
            for name in shard["files"]:
                (self.root / name).unlink(missing_ok=True)
        self.shards = []
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_images
        return start, min(start + self.shard_images, self.n_images)

    def write_shard(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        if index != len(self.shards):
            raise RuntimeError(f"shards must be written in order: expected {len(self.shards)}, got {index}")
        start, stop = self.shard_range(index)
        files = {}
        for kind, array in arrays.items():
            if array.shape[0] != stop - start:
                raise RuntimeError(f"{kind} shard {index} has {array.shape[0]} rows, expected {stop - start}")
            name = shard_name(kind, index)
            files[name] = _write_npy(self.root / name, array)
        self.shards.append({"index": index, "start": start, "stop": stop, "files": files})
        self._write_meta(complete=len(self.shards) == self.n_shards)

    def _write_meta(self, complete: bool) -> None:
        replace(self.meta, format=FORMAT, job=self.job, complete=complete, n_images=self.n_images,
                shard_images=self.shard_images, n_shards=self.n_shards, shards=self.shards).dump(self.meta_path)

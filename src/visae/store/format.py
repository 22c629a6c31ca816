"""On-disk conventions shared by the store writer and reader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

FORMAT = "visae-activations/1"

# numpy has no bfloat16: bf16 shards are stored as uint16 bit patterns and viewed back.
STORE_DTYPES = {"float16": (np.float16, torch.float16),
                "bfloat16": (np.uint16, torch.bfloat16),
                "float32": (np.float32, torch.float32)}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "float16": "float16",
                 "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp32": "float32", "float": "float32", "float32": "float32"}


def shard_name(kind: str, index: int) -> str:
    return f"{kind}_{index:05d}.npy"


def canonical_dtype(name: str) -> str:
    from visae.errors import VisaeError
    try:
        return DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise VisaeError(f"unknown dtype {name!r}: use one of fp16, bf16, fp32") from None


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast activations to the store dtype and return the numpy array that is written."""
    torch_dtype = STORE_DTYPES[dtype][1]
    t = t.detach().to("cpu", torch_dtype).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """View a stored numpy array as a torch tensor of the store dtype (no copy)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


META_DIGEST = "meta_sha256"  # meta.json's own digest: an edit to any other key is detected


def meta_digest(meta: dict) -> str:
    """sha256 of meta.json's content without its own digest (canonical JSON, keys sorted)."""
    body = {k: v for k, v in meta.items() if k != META_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def seal_meta(meta: dict) -> dict:
    return {**meta, META_DIGEST: meta_digest(meta)}

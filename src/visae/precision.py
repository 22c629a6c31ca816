"""The precision of a stage's matmuls: one vocabulary for extraction and training.

- fp32: fp32 throughout (the CPU default: the same numbers run to run).
- tf32: fp32 tensors, fp32 matmuls on TF32 tensor cores (CUDA; what saev ran); fp32 elsewhere.
- bf16, fp16: torch.autocast to that dtype (weights stay fp32).
- auto: bf16 on CUDA (its tensor cores), fp32 elsewhere (a CPU runs low-precision matmuls slower).
Training offers no fp16 (it would need loss scaling).
"""

from __future__ import annotations

import contextlib

import torch

from visae.errors import VisaeError

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str, device: str, allowed: tuple = PRECISIONS) -> str:
    """The precision `auto` stands for on `device`; one clear line for a name not in `allowed`."""
    if precision not in allowed:
        raise VisaeError(f"unknown precision {precision!r}: use one of {', '.join(allowed)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


@contextlib.contextmanager
def applied(precision: str, device: str):
    """The context a stage's matmuls run in: autocast at bf16/fp16, TF32 matmuls at tf32 on CUDA
    (a global setting, restored on exit), nothing at fp32."""
    kind = torch.device(device).type
    if precision in AUTOCAST_DTYPES:
        with torch.autocast(kind, dtype=AUTOCAST_DTYPES[precision]):
            yield
        return
    before = torch.get_float32_matmul_precision()
    if precision == "tf32" and kind == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)

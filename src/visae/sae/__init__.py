"""Sparse autoencoders: the grid's keys (`config`), modules (`modules`, with their CPU kernels in
`kernels` and the optimiser and schedules in `optim`), checkpoints (`load`/`save`), the train/held-out
split (`split_images`) and grid training (`visae train`, in `train`).

Names load on first use, so importing `visae.sae.config` (the workflow does, at parse time) does
not import torch."""

import importlib

_WHERE = {
    **dict.fromkeys(["check_compatible", "load", "read_config", "save", "source_mismatch"], "checkpoint"),
    **dict.fromkeys(["SAE", "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "MatryoshkaSAE", "build_sae",
                     "estimate_normalisation"], "modules"),
    **dict.fromkeys(["lr_at", "sparsity_at", "make_adam"], "optim"),
    "ARCHITECTURES": "config", "split_images": "split",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'visae.sae' has no attribute {name!r}")
    return getattr(importlib.import_module(f"visae.sae.{_WHERE[name]}"), name)

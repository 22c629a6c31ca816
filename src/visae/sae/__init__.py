"""Sparse autoencoders: modules (`modules`), checkpoints (`load`/`save`), the train/held-out
split (`split_images`) and grid training (`visae train`, in `train`)."""

from visae.sae.checkpoint import check_compatible, load, read_config, save, source_mismatch
from visae.sae.modules import (ARCHITECTURES, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, SAE, TopKSAE,
                               build_sae, estimate_normalisation, lr_at, sparsity_at)
from visae.sae.split import split_images

__all__ = ["ARCHITECTURES", "SAE", "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "MatryoshkaSAE",
           "build_sae", "estimate_normalisation", "lr_at", "sparsity_at", "load", "save", "read_config",
           "check_compatible", "source_mismatch", "split_images"]

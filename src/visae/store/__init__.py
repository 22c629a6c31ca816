"""Activation store: one directory per (model, dataset, layer) of checksummed `.npy` shards.

Layout of a store directory:
    meta.json               model, layer, token layout, dataset, dtype, counts, sha256 per file
    acts_00000.npy          [images, tokens, d_model] activations (fp16 by default)
    labels_00000.npy        [images] int64 image labels
    patch_labels_00000.npy  [images, patches] int16 per-patch labels (segmentation sets only)
"""

from visae.store.format import FORMAT, shard_name
from visae.store.loader import TokenLoader
from visae.store.meta import StoreLayout, StoreMeta, TokenLayout
from visae.store.reader import ActivationStore, verify_store
from visae.store.writer import StoreWriter

__all__ = ["FORMAT", "shard_name", "ActivationStore", "TokenLoader", "StoreLayout", "StoreMeta", "TokenLayout",
           "StoreWriter", "verify_store"]

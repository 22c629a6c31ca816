"""The offline demo's own ViTs: pixels and augmentations, the SimCLR objective, the training loop.

`pixels` (the backbone's preprocessing on uint8 batches, the augmentations), `objectives` (NT-Xent
and the projection head) and `loop` (`pretrain()`, its outputs and the `visae pretrain` command);
the kNN and linear probes it scores its models with are `visae.analysis.probes`.
"""

from visae.pretrain.loop import OBJECTIVES, pretrain
from visae.pretrain.objectives import ProjectionHead, nt_xent
from visae.pretrain.pixels import Pixels, flip_views, simclr_views

__all__ = ["OBJECTIVES", "Pixels", "ProjectionHead", "flip_views", "nt_xent", "pretrain", "simclr_views"]

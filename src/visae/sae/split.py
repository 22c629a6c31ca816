"""The train / held-out split, in one place: training and evaluation both call this.

The held-out part is the LAST `heldout` fraction of the store's images (at least one image when
heldout > 0); training reads only the images before it.
"""

from __future__ import annotations

from visae.errors import VisaeError


def split_images(n_images: int, heldout: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train_range, heldout_range) as half-open image ranges."""
    if not 0.0 <= float(heldout) < 1.0:
        raise VisaeError(f"heldout must be in [0, 1), got {heldout}")
    n_held = 0 if heldout == 0 else max(1, int(round(n_images * float(heldout))))
    n_train = n_images - n_held
    if n_train < 1:
        raise VisaeError(f"the store has {n_images} images: too few to hold out {heldout:.0%} and train on the rest")
    return (0, n_train), (n_train, n_images)

"""The train / held-out split, in one place: training and evaluation both call this.

The held-out images are the first `heldout` fraction (at least one image when heldout > 0) of a
seeded permutation of the store's images, so on a store sorted by class (ImageFolder order) the
held-out images come from every class, not from the last few. A smaller fraction with the same
seed holds out a subset of a larger one, so an SAE can be evaluated on less than it held out.
"""

from __future__ import annotations

import hashlib

import numpy as np

from visae.errors import VisaeError

SPLIT_METHOD = "seeded permutation of images"  # what config.json records as its split's method


def split_images(n_images: int, heldout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_images, heldout_images): sorted image indices."""
    if not 0.0 <= float(heldout) < 1.0:
        raise VisaeError(f"heldout must be in [0, 1), got {heldout}")
    n_held = 0 if heldout == 0 else max(1, int(round(n_images * float(heldout))))
    if n_images - n_held < 1:
        raise VisaeError(f"the store has {n_images} images: too few to hold out {heldout:.0%} and train on the rest")
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n_images)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def split_record(n_images: int, heldout: float, seed: int) -> dict:
    """What an SAE's config.json says about its split (enough to rebuild and to check it)."""
    train, held = split_images(n_images, heldout, seed)
    return {"heldout": heldout, "seed": int(seed), "method": SPLIT_METHOD,
            "n_images": n_images, "train_images": len(train), "heldout_images": len(held),
            "heldout_sha256": hashlib.sha256(held.astype("<i8").tobytes()).hexdigest()}

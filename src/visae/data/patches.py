"""Per-patch labels from a per-pixel mask: the targets of segmentation probes on ViT tokens."""

from __future__ import annotations

import numpy as np

from visae.errors import VisaeError

# How a patch's label is voted from its pixels:
# - labelled-majority (visae's default): the most frequent label among the pixels that are not
#   the ignore label, so a patch half background, half "person" is "person";
# - all-pixel-mode (the paper's, saev 2284f52's semseg probe): the mode over every pixel of the
#   patch, the ignore/background label included.
VOTES = ("labelled-majority", "all-pixel-mode")


def patch_labels(mask: np.ndarray, grid: tuple[int, int], ignore_index: int | None,
                 vote: str = "labelled-majority") -> np.ndarray:
    """Label of each patch by `vote` (see VOTES), row-major, as (gh*gw,) int16.

    `mask` is (H, W) already resized/cropped to the model input, H = gh*ph and W = gw*pw.
    Ties go to the smallest label (as torch.mode on CPU, what saev ran); under labelled-majority
    a patch whose pixels are all `ignore_index` gets `ignore_index`. One bincount over
    (patch, label) codes: no Python loop over patches.
    """
    if vote not in VOTES:
        raise VisaeError(f"unknown patch_vote {vote!r}: use one of {', '.join(VOTES)}")
    mask = np.asarray(mask)
    gh, gw = (int(g) for g in grid)
    if mask.ndim != 2:
        raise VisaeError(f"patch_labels needs a 2-D (H, W) mask; got shape {mask.shape}")
    h, w = mask.shape
    if gh <= 0 or gw <= 0 or h % gh or w % gw:
        raise VisaeError(f"mask of {h}x{w} pixels (HxW) does not split into a {gh}x{gw} patch grid")
    ph, pw = h // gh, w // gw
    m = mask.astype(np.int64, copy=False)
    # patch index of every pixel, row-major over the grid
    patch = (np.arange(h) // ph)[:, None] * gw + (np.arange(w) // pw)[None, :]
    if ignore_index is None or vote == "all-pixel-mode":
        valid_labels, valid_patch = m.ravel(), patch.ravel()
    else:
        keep = m != ignore_index
        valid_labels, valid_patch = m[keep], patch[keep]
    if valid_labels.size and valid_labels.min() < 0:
        raise VisaeError(f"mask has negative label {int(valid_labels.min())} (ignore_index is {ignore_index})")
    k = int(valid_labels.max()) + 1 if valid_labels.size else 1
    n = gh * gw
    counts = np.bincount(valid_patch * k + valid_labels, minlength=n * k).reshape(n, k)
    out = counts.argmax(axis=1)  # argmax returns the first maximum: ties -> smallest label
    if ignore_index is not None:
        out[counts.sum(axis=1) == 0] = ignore_index
    info = np.iinfo(np.int16)
    if out.size and (out.max() > info.max or out.min() < info.min):
        raise VisaeError(f"patch labels exceed the int16 range (max {int(out.max())})")
    return out.astype(np.int16)

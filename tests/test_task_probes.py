"""The task probes (`visae probe`): mIoU and pixel predictions on hand-made inputs, the probe
recipe on features that do and do not separate the classes, the command end to end on both
tasks (deterministic, its files, its refusals), and a segmentation probe on real CamVid masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visae.analysis.probes import LinearProbe, mean_iou, pixel_predictions


def test_mean_iou_on_hand_made_predictions():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 9, 9]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 3]]])
    miou, per_class = mean_iou(pred, target, n_classes=5, ignore_index=9)
    # class 0: tp 1, union 3 (target 2 + pred 2 - 1); class 1: tp 2, union 3; class 2: tp 1, union 2;
    # class 3 and the two "0"s predicted on ignore pixels are not counted; class 4 is in neither
    assert per_class[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(per_class[3]) and math.isnan(per_class[4])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert per_class.shape == (5,) and per_class.dtype == np.float64


def test_mean_iou_counts_a_class_only_predicted_and_keeps_none_ignore():
    target = torch.zeros(1, 2, 2, dtype=torch.int64)
    pred = torch.tensor([[[0, 0], [0, 1]]])
    miou, per_class = mean_iou(pred, target, n_classes=3, ignore_index=None)
    assert per_class[0] == pytest.approx(3 / 4) and per_class[1] == 0.0 and math.isnan(per_class[2])
    assert miou == pytest.approx(3 / 8)
    all_ignored, _ = mean_iou(pred, torch.full((1, 2, 2), 7), n_classes=3, ignore_index=7)
    assert math.isnan(all_ignored)


def test_mean_iou_refuses_labels_out_of_range():
    from visae.errors import VisaeError

    with pytest.raises(VisaeError, match="outside 0..2"):
        mean_iou(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 5), n_classes=3, ignore_index=None)


def _probe(n_classes: int, d: int = 4) -> LinearProbe:
    return LinearProbe("segmentation", torch.zeros(n_classes, d), torch.zeros(n_classes), torch.zeros(d),
                       torch.ones(d), [f"c{i}" for i in range(n_classes)])


def test_pixel_predictions_shapes_and_constant_patches():
    grid, size, c = (2, 3), (8, 12), 4
    logits = torch.full((2, 6, c), -5.0)
    classes = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 3, 3, 3, 3, 3]])
    logits.scatter_(2, classes[..., None], 5.0)  # each patch one class, the same logit across it
    pred = pixel_predictions(_probe(c), logits, grid, size)
    assert pred.shape == (2, 8, 12) and pred.dtype == torch.int64
    assert (pred[1] == 3).all()
    # every patch's centre pixels take its class (bilinear blends only near patch borders)
    for p in range(6):
        r, col = divmod(p, 3)
        assert (pred[0, 4 * r + 1:4 * r + 3, 4 * col + 1:4 * col + 3] == classes[0, p]).all()
    uniform = pixel_predictions(_probe(c), torch.tensor([0.0, 2.0, 1.0, 0.0]).expand(1, 6, c), grid, size)
    assert (uniform == 1).all()

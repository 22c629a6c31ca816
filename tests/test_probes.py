"""The kNN and linear probes (`visae.analysis.probes`): right on separable features, chance on
shuffled labels, any number of classes, deterministic, and blind to the caller's RNG."""

from __future__ import annotations

import pytest
import torch

from visae.analysis.probes import knn_accuracy, linear_probe_accuracy


def clusters(n_classes: int, per_class: int, seed: int, d: int = 16, spread: float = 0.05):
    """Features drawn (with `seed`) around one fixed random unit centre per class, and their labels."""
    centres = torch.nn.functional.normalize(torch.randn(n_classes, d, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return centres[y] + spread * torch.randn(len(y), d, generator=torch.Generator().manual_seed(seed)), y


@pytest.mark.parametrize("n_classes", [3, 12])  # 12: more classes than Fashion-MNIST's 10
def test_separable_features_score_one(n_classes):
    train_f, train_y = clusters(n_classes, 20, seed=1)
    test_f, test_y = clusters(n_classes, 5, seed=2)
    assert knn_accuracy(train_f, train_y, test_f, test_y, n_classes, k=5) == 1.0
    assert linear_probe_accuracy(train_f, train_y, test_f, test_y, n_classes) == 1.0


def test_shuffled_labels_score_about_chance():
    train_f, train_y = clusters(4, 100, seed=0)
    test_f, test_y = clusters(4, 100, seed=2)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(3))]
    assert knn_accuracy(train_f, shuffled, test_f, test_y, 4, k=20) < 0.4  # chance 0.25
    assert linear_probe_accuracy(train_f, shuffled, test_f, test_y, 4) < 0.4


def test_linear_probe_is_deterministic_and_leaves_the_rng_alone():
    train_f, train_y = clusters(5, 10, spread=0.8, seed=4)
    test_f, test_y = clusters(5, 10, spread=0.8, seed=5)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = linear_probe_accuracy(train_f, train_y, test_f, test_y, 5, steps=50)
    assert torch.equal(torch.rand(3), expected_next)
    assert linear_probe_accuracy(train_f, train_y, test_f, test_y, 5, steps=50) == first
    assert 0.2 < first < 1.0  # overlapping clusters: neither chance nor perfect

"""Abstraction of latents: planted specific, abstract and mixed latents, pads, and the chance baseline."""

from __future__ import annotations

import json
from math import factorial

import numpy as np
import pytest

from visae.analysis.abstraction import chance_top_labels, latent_abstraction, summarize_abstraction
from visae.data.fashion_mnist import CLASSES as FMNIST
from visae.data.hierarchy import FASHION_MNIST_GROUPS, Hierarchy
from visae.errors import VisaeError

TSHIRT, TROUSER, PULLOVER, DRESS, COAT, SANDAL, SHIRT, SNEAKER, BAG, BOOT = range(10)


@pytest.fixture
def tree() -> Hierarchy:
    return Hierarchy.from_groups(FMNIST, FASHION_MNIST_GROUPS)


def row(*parts, width=16):
    """A top-image label row from (class, count) pairs, then -1 pads."""
    labels = [c for c, n in parts for _ in range(n)]
    return labels + [-1] * (width - len(labels))


def planted() -> np.ndarray:
    return np.array([
        row((TROUSER, 16)),                                   # 0 specific, pure
        row((SANDAL, 13), (BAG, 3)),                          # 1 specific: 13/16 >= 0.8
        row((TSHIRT, 4), (PULLOVER, 4), (COAT, 4), (SHIRT, 4)),  # 2 abstract: tops
        row((SANDAL, 6), (SNEAKER, 5), (BOOT, 5)),            # 3 abstract: footwear
        row((SHIRT, 12), (COAT, 4)),                          # 4 abstract: 12/16 < 0.8 of one class
        row((SANDAL, 8), (SHIRT, 8)),                         # 5 mixed across groups
        row((SHIRT, 13), (SNEAKER, 3))[::-1],                 # 6 specific, labels in any order
        row((DRESS, 3), (COAT, 3)),                           # 7 abstract from 6 images, 10 pads
        row((BAG, 4)),                                        # 8 too few (4 < 5)
        row(),                                                # 9 no images at all
    ])


def test_planted_latents_are_classified(tree):
    result = latent_abstraction(planted(), tree)
    assert result.category.tolist() == ["specific", "specific", "abstract", "abstract", "abstract", "mixed",
                                        "specific", "abstract", "too_few", "too_few"]
    assert result.n_images.tolist() == [16, 16, 16, 16, 16, 16, 16, 6, 4, 0]
    assert result.n_classes.tolist() == [1, 2, 4, 3, 2, 2, 2, 2, 1, 0]
    assert result.lca_depth.tolist() == [2, 0, 1, 1, 1, 0, 0, 1, 2, -1]
    np.testing.assert_allclose(result.purity[:9], [1, 13 / 16, 0.25, 6 / 16, 0.75, 0.5, 13 / 16, 0.5, 1])
    np.testing.assert_allclose(result.coarse_purity[:9], [1, 13 / 16, 1, 1, 1, 0.5, 13 / 16, 1, 1])
    p = np.array([13, 3]) / 16
    np.testing.assert_allclose(result.entropy[[0, 1, 2, 5, 7]], [0, -(p * np.log2(p)).sum(), 2, 1, 1])
    assert np.isnan(result.purity[9]) and np.isnan(result.entropy[9])
    assert set(result.columns()) == {"n_images", "purity", "coarse_purity", "entropy_bits", "n_classes",
                                     "lca_depth", "category"}


def test_share_and_min_images_move_the_boundaries(tree):
    result = latent_abstraction(planted(), tree, share=0.75, min_images=4)
    assert result.category[[4, 8]].tolist() == ["specific", "specific"]
    strict = latent_abstraction(planted(), tree, share=1.0)
    assert strict.category[[1, 5, 6]].tolist() == ["mixed", "mixed", "mixed"]


def test_flat_tree_has_no_abstract_latents():
    result = latent_abstraction(planted(), Hierarchy.flat(FMNIST))
    assert "abstract" not in result.category.tolist()
    assert result.category[2] == "mixed" and result.lca_depth[0] == 1


@pytest.mark.parametrize("labels, kwargs, message", [
    (np.full((2, 4), 10), {}, "top-image labels hold class 10, outside 0..9 (-1 pads)"),
    (np.full((2, 4), -2), {}, "top-image labels hold class -2, outside 0..9"),
    (np.zeros(4, dtype=int), {}, "top-image labels must be an integer array [latents, N]"),
    (np.zeros((2, 4)), {}, "top-image labels must be an integer array [latents, N]; got float64"),
    (np.zeros((2, 4), dtype=int), {"share": 0}, "abstraction share must be in (0, 1]; got 0"),
    (np.zeros((2, 4), dtype=int), {"min_images": 0}, "abstraction min_images must be an integer >= 1; got 0"),
])
def test_bad_inputs_are_one_line_errors(tree, labels, kwargs, message):
    with pytest.raises(VisaeError) as err:
        latent_abstraction(labels, tree, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_chance_draws_keep_counts_without_replacement():
    n_images = np.array([5, 0, 12, 3])
    drawn = chance_top_labels(n_images, np.arange(40) + 100, seed=3)
    assert drawn.shape == (4, 12)
    assert ((drawn >= 0).sum(axis=1) == n_images).all()
    for r, k in zip(drawn, n_images):
        assert len(set(r[:k])) == k and set(r[:k]) <= set(range(100, 140)) and (r[k:] == -1).all()
    assert (chance_top_labels(n_images, np.arange(40), seed=3) == drawn - 100 * (drawn >= 0)).all()


def expected_max_share(k: int, n_classes: int) -> float:
    """E[largest class count] / k for k draws over equally likely classes (multinomial), exactly:
    P(max <= m) = k! [x^k] (sum_{j<=m} (x/C)^j / j!)^C."""
    expected = 0.0
    for m in range(k):
        poly = np.array([(1 / n_classes) ** j / factorial(j) for j in range(m + 1)])
        power = np.array([1.0])
        for _ in range(n_classes):
            power = np.convolve(power, poly)[:k + 1]
        p_at_most = factorial(k) * (power[k] if len(power) > k else 0.0)
        expected += 1 - p_at_most
    return expected / k


def test_chance_baseline_of_balanced_labels_has_the_expected_purity(tree):
    covered = np.repeat(np.arange(10), 2000)  # balanced; 20,000 images, so draws are nearly independent
    top = np.full((3000, 16), TROUSER)  # a model of purely specific latents
    summary = summarize_abstraction(latent_abstraction(top, tree), covered, tree, seed=1, n_boot=200)
    chance = summary["chance"]
    assert chance["mean_purity"]["value"] == pytest.approx(expected_max_share(16, 10), abs=0.005)
    assert expected_max_share(2, 2) == pytest.approx(0.75) and expected_max_share(1, 10) == pytest.approx(1)
    assert summary["model"]["counts"] == {"specific": 3000, "abstract": 0, "mixed": 0, "too_few": 0}
    assert summary["model"]["mean_purity"] == {"value": 1.0, "low": 1.0, "high": 1.0, "n": 3000}
    assert chance["counts"]["specific"] == 0 and chance["n_classified"] == 3000
    assert summary["excess"]["mean_purity"] == pytest.approx(1 - chance["mean_purity"]["value"])
    assert sum(chance["purity_histogram"]["counts"]) == 3000


def test_bootstrap_interval_contains_the_estimate_and_follows_the_seed(tree):
    top = np.concatenate([planted()] * 30)
    covered = np.repeat(np.arange(10), 50)
    result = latent_abstraction(top, tree)
    first = summarize_abstraction(result, covered, tree, seed=7, n_boot=300)
    assert json.loads(json.dumps(first)) == first  # JSON-able (no NaN here: every set is non-empty)
    model = first["model"]
    assert model["n_latents"] == 300 and model["n_classified"] == 240
    assert model["fractions"]["abstract"] == pytest.approx(0.4)
    assert model["abstract_fraction"]["value"] == pytest.approx(0.5)  # among classified
    for key in ("mean_purity", "abstract_fraction", "mean_lca_depth"):
        score = model[key]
        assert score["low"] < score["value"] < score["high"]
    assert model["purity_histogram"]["counts"] == [0, 0, 30, 30, 0, 60, 0, 30, 60, 30]
    assert summarize_abstraction(result, covered, tree, seed=7, n_boot=300) == first
    other = summarize_abstraction(result, covered, tree, seed=8, n_boot=300)
    assert other["model"]["mean_purity"]["low"] != model["mean_purity"]["low"]
    assert other["model"]["mean_purity"]["value"] == model["mean_purity"]["value"]


def test_summary_rejects_too_few_covered_labels(tree):
    result = latent_abstraction(planted(), tree)
    with pytest.raises(VisaeError, match=r"a latent has 16 top images but the covered labels hold only 10; pass"):
        summarize_abstraction(result, np.arange(10), tree)
    with pytest.raises(VisaeError, match=r"covered labels hold class 12, outside 0..9;"):
        summarize_abstraction(result, np.full(100, 12), tree)

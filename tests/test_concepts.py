"""Concept probe: planted class detectors are found, the matched baseline stays low, edge cases report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import sparse

from visae.analysis.concepts import (best_thresholds, concept_probe, matched_latents, own_class_thresholds,
                                    stratified_halves)
from visae.errors import VisaeError

N_PER_CLASS, N_CLASSES, H = 100, 6, 60
EXACT, GRADED, HALF_A, HALF_B = 17, 30, 40, 41


def planted_acts(seed: int = 0) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Random sparse background (10% density) plus planted latents:
    EXACT fires exactly on class 2; GRADED fires on every image, above 0.6 of its max exactly on
    class 4; HALF_A and HALF_B each fire on one half of class 5 and nowhere else."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(N_CLASSES), N_PER_CLASS))
    acts = sparse.random(len(labels), H, density=0.1, rng=rng, format="lil", dtype=np.float32)
    acts[:, [EXACT, GRADED, HALF_A, HALF_B]] = 0
    n = len(labels)
    acts[:, EXACT] = np.where(labels == 2, 1 + rng.random(n), 0)[:, None]
    acts[:, GRADED] = np.where(labels == 4, 0.8 + 0.2 * rng.random(n), 0.5 * rng.random(n) + 0.01)[:, None]
    fives = np.flatnonzero(labels == 5)
    acts[fives[::2], HALF_A] = 1 + rng.random(len(fives[::2]))
    acts[fives[1::2], HALF_B] = 1 + rng.random(len(fives[1::2]))
    return acts.tocsr(), labels


@pytest.fixture(scope="module")
def probe():
    acts, labels = planted_acts()
    return concept_probe(acts, labels, N_CLASSES, seed=0, n_thresholds=10)


def test_exact_latent_is_chosen_with_f1_one_and_its_baseline_is_far_below(probe):
    row = probe["rows"][2]
    assert row["status"] == "ok" and (row["n_select"], row["n_evaluate"]) == (50, 50)
    assert row["best_latent"] == EXACT and row["top_latents"][0] == EXACT
    assert row["f1_single_select"] == 1.0 and row["f1_single"] == 1.0
    assert row["threshold"] == 0.0  # "fires at all" is enough
    assert row["baseline_latent"] not in row["top_latents"]
    assert row["baseline_f1_single"] < 0.4 and row["baseline_f1_top"] < 0.45


def test_threshold_sweep_finds_the_graded_latent(probe):
    row = probe["rows"][4]
    assert row["best_latent"] == GRADED and row["f1_single"] == 1.0
    acts, labels = planted_acts()
    values = acts[:, GRADED].toarray().ravel()
    assert values[labels != 4].max() <= row["threshold"] < values[labels == 4].min()


def test_split_class_is_found_by_the_combination_of_two(probe):
    row = probe["rows"][5]
    assert sorted(row["top_latents"][:2]) == [HALF_A, HALF_B] and row["top_used"] == 2
    assert row["f1_single"] == pytest.approx(2 / 3, abs=0.05)
    assert row["f1_top_select"] == row["f1_top"] == 1.0
    exact = probe["rows"][2]  # one latent suffices: the four weaker ones are left out
    assert (exact["top_used"], exact["f1_top"]) == (1, 1.0)


def test_summary_reads_against_the_baseline(probe):
    summary = probe["summary"]
    assert (summary["n_classes"], summary["n_scored"]) == (N_CLASSES, N_CLASSES)
    rows = probe["rows"]
    assert summary["mean_f1_single"] == pytest.approx(np.mean([r["f1_single"] for r in rows]))
    assert summary["mean_gap_single"] == pytest.approx(summary["mean_f1_single"] - summary["mean_baseline_f1_single"])
    assert summary["mean_gap_single"] > 0.2 and summary["mean_gap_top"] > 0.2
    # a prefix of one is the single latent (its selection F1 kept in float32: hence the 1e-6)
    assert all(r["f1_top_select"] >= r["f1_single_select"] - 1e-6 for r in rows)
    assert probe["settings"]["n_select"] == probe["settings"]["n_evaluate"] == 300
    assert json.loads(json.dumps(probe)) == probe


def test_classes_without_images_or_with_one_are_reported():
    acts, labels = planted_acts()
    labels = labels.copy()
    labels[0] = 6  # one image of class 6; class 7 has none
    result = concept_probe(acts, labels, 8, seed=0)
    six, seven = result["rows"][6], result["rows"][7]
    assert (six["status"], six["n_images"], six["f1_single"]) == ("too_few_images", 1, None)
    assert (seven["status"], seven["n_images"], seven["best_latent"], seven["f1_top"]) == ("no_images", 0, None, None)
    assert result["summary"]["n_scored"] == 6
    assert (result["summary"]["n_no_images"], result["summary"]["n_too_few_images"]) == (1, 1)


def test_reproducible_with_the_seed(probe):
    acts, labels = planted_acts()
    assert concept_probe(acts, labels, N_CLASSES, seed=0, n_thresholds=10) == probe
    other = concept_probe(acts, labels, N_CLASSES, seed=1, n_thresholds=10)
    assert [r["baseline_top_latents"] for r in other["rows"]] != [r["baseline_top_latents"] for r in probe["rows"]]
    assert other["rows"][2]["best_latent"] == EXACT


def test_sweep_matches_brute_force():
    rng = np.random.default_rng(5)
    n, h, n_classes, steps = 120, 9, 4, 5
    dense = rng.random((n, h)) * (rng.random((n, h)) < 0.4)
    dense[:, 3] = 0  # a latent that never fires
    labels = rng.integers(0, n_classes, n)
    matrix = sparse.csc_matrix(dense)
    scale = dense.max(axis=0)
    best_f1, best_step = best_thresholds(matrix, scale, labels, n_classes, steps)
    for latent in range(h):
        for c in range(n_classes):
            f1 = []
            for step in range(steps):
                fired = dense[:, latent] > step / steps * scale[latent]
                tp = (fired & (labels == c)).sum()
                f1.append(2 * tp / (fired.sum() + (labels == c).sum()))
            assert best_f1[latent, c] == pytest.approx(max(f1), rel=1e-6)
            assert best_step[latent, c] == int(np.argmax(f1))
    square = sparse.csc_matrix(dense[:, :n_classes])
    own_f1, own_step = own_class_thresholds(square, scale[:n_classes], labels, steps)
    diagonal = np.arange(n_classes)
    np.testing.assert_allclose(own_f1, best_f1[diagonal, diagonal], rtol=1e-6)
    assert (own_step == best_step[diagonal, diagonal]).all()


def test_halves_split_each_class_evenly():
    labels = np.repeat([0, 1, 2], [7, 4, 1])
    select, evaluate = stratified_halves(labels, np.random.default_rng(0))
    assert np.bincount(labels[select], minlength=3).tolist() == [4, 2, 1]
    assert np.bincount(labels[evaluate], minlength=3).tolist() == [3, 2, 0]
    assert sorted(np.concatenate([select, evaluate]).tolist()) == list(range(12))


def test_matched_latents_are_near_in_frequency_and_never_the_chosen():
    frequency = np.arange(100) / 100
    chosen = np.array([[50, 10], [51, 99]])
    matched = matched_latents(chosen, frequency, 4, np.random.default_rng(0))
    assert matched.shape == (2, 2)
    assert not set(matched[:, 0]) & {50, 51} and len(set(matched[:, 0])) == 2
    assert all(abs(frequency[m] - frequency[c]) <= 0.06 for m, c in zip(matched.ravel(), chosen.ravel()))


@pytest.mark.parametrize("change, message", [
    (lambda a, y: (a, y[:-1]), "concept probe: activations have 600 images but labels have 599; pass the labels"),
    (lambda a, y: (a.toarray(), y), "concept probe needs a scipy.sparse [images, latents] activation matrix; got ndarray"),
    (lambda a, y: (a, y + 1), "concept probe labels must lie in 0..5; got 1..6"),
    (lambda a, y: (a, y.astype(float)), "concept probe labels must be a 1-D integer array; got float64"),
    (lambda a, y: (-a, y), "concept probe activations must be >= 0"),
    (lambda a, y: (a[:, :9], y), "concept probe top=5 needs at least 10 latents"),
])
def test_bad_inputs_are_one_line_errors(change, message):
    acts, labels = change(*planted_acts())
    with pytest.raises(VisaeError) as err:
        concept_probe(acts, labels, N_CLASSES)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("setting, value", [("n_thresholds", 0), ("top", 2.0), ("n_matched", True),
                                             ("n_thresholds", 5000)])
def test_bad_settings_are_one_line_errors(setting, value):
    acts, labels = planted_acts()
    with pytest.raises(VisaeError, match=rf"concept probe {setting} must be an integer in 1\.\.\d+; got {value!r}"):
        concept_probe(acts, labels, N_CLASSES, **{setting: value})

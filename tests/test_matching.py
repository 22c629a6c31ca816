"""Latent matching across two SAEs: correlations against numpy, the dense and sparse assignments
against each other and against planted pairings, the permutation null, the user errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from visae.analysis.matching import assign, correlations, match_latents, working_memory_bytes
from visae.errors import VisaeError
from visae.tools.bench_compare import synthetic_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_acts(rng, n: int, h: int, density: float = 0.1) -> sp.csr_matrix:
    mask = rng.random((n, h)) < density
    return sp.csr_matrix(np.where(mask, rng.lognormal(0.0, 0.5, (n, h)), 0.0).astype(np.float32))


def reference(a: sp.csr_matrix, b: sp.csr_matrix) -> np.ndarray:
    """numpy.corrcoef between the columns, 0 for a zero-variance column."""
    x, y = a.toarray().astype(np.float64), b.toarray().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(x.T, y.T)[:x.shape[1], x.shape[1]:]
    return np.nan_to_num(r, nan=0.0)


def test_correlations_equal_numpy_corrcoef_in_blocks_and_chunks():
    rng = np.random.default_rng(0)
    a, b = sparse_acts(rng, 300, 40), sparse_acts(rng, 300, 30, density=0.3)
    a = sp.lil_matrix(a)
    a[:, 3] = 0.0          # dead: zero variance
    a[:, 5] = 2.5          # fires everywhere at one value: zero variance
    b = sp.lil_matrix(b)
    b[:, 7] = 0.0
    a, b = a.tocsr(), b.tocsr()
    expected = reference(a, b)
    corr = correlations(a, b, top_k=5, block=7, chunk=64, keep_dense=True)  # ragged blocks and chunks
    assert corr.dense.dtype == np.float32 and corr.dense.shape == (40, 30)
    np.testing.assert_allclose(corr.dense, expected, atol=2e-6)
    assert not corr.dense[[3, 5]].any() and not corr.dense[:, 7].any()
    assert corr.row_values.shape == corr.row_indices.shape == (40, 5)
    assert corr.col_values.shape == corr.col_indices.shape == (30, 5)
    np.testing.assert_allclose(corr.row_values, -np.sort(-expected, axis=1)[:, :5], atol=2e-6)
    np.testing.assert_allclose(corr.col_values, -np.sort(-expected.T, axis=1)[:, :5], atol=2e-6)
    rows = np.arange(40)[:, None]
    np.testing.assert_allclose(expected[rows, corr.row_indices], corr.row_values, atol=2e-6)
    np.testing.assert_allclose(expected[corr.col_indices, np.arange(30)[:, None]], corr.col_values, atol=2e-6)
    np.testing.assert_allclose(corr.row_max, expected.max(axis=1), atol=2e-6)
    np.testing.assert_allclose(corr.col_max, expected.max(axis=0), atol=2e-6)
    # Without the dense matrix: the same candidates, and no dense matrix.
    lean = correlations(a, b, top_k=5, block=16, chunk=300)
    assert lean.dense is None
    np.testing.assert_allclose(lean.row_values, corr.row_values, atol=1e-6)
    np.testing.assert_allclose(lean.col_values, corr.col_values, atol=1e-6)


def test_identical_inputs_match_fully_at_one_on_both_paths():
    a, _, _ = synthetic_pair(600, 120, freq=(0.03, 0.3), seed=3)
    corr = correlations(a, a, keep_dense=True)
    np.testing.assert_allclose(corr.row_max, 1.0, atol=1e-5)
    np.testing.assert_array_equal(corr.row_indices[:, 0], np.arange(120))
    for method in ("dense", "sparse"):
        match = assign(corr, method=method)
        assert match.method == method
        np.testing.assert_array_equal(match.partner, np.arange(120))
        np.testing.assert_allclose(match.correlation, 1.0, atol=1e-5)
    sub = correlations(a, a[:, :70], keep_dense=True)   # rectangular: B is 70 of A's latents
    for method in ("dense", "sparse"):
        match = assign(sub, method=method)
        np.testing.assert_array_equal(match.partner, np.r_[np.arange(70), np.full(50, -1)])
        np.testing.assert_array_equal(match.partner_of_b, np.arange(70))
    for limit, method in ((None, "dense"), (0, "sparse")):
        s = match_latents(a, a, **({} if limit is None else {"dense_limit": limit}))["summary"]
        assert s["method"] == method
        assert s["matched"] == s["alive_a"] == 120 and s["matched_fraction_a"] == s["matched_fraction_b"] == 1.0
        assert s["null_matched_fraction_a"] < 0.05 and s["unique_a"] == s["unique_b"] == 0


@pytest.mark.parametrize("dense_limit", [None, 0], ids=["dense", "sparse"])
def test_a_permuted_noisy_sae_is_matched_back_to_its_permutation(dense_limit):
    rng = np.random.default_rng(1)
    a, _, _ = synthetic_pair(1500, 300, freq=(0.01, 0.2), seed=4)
    perm = rng.permutation(300)
    b = a[:, perm].tocsr()                                   # B latent j is A latent perm[j] ...
    b.data *= rng.lognormal(0.0, 0.1, b.nnz).astype(np.float32)  # ... with noisy magnitudes
    b = (b + sparse_acts(rng, 1500, 300, density=0.002)).tocsr()  # ... and a few stray firings
    out = match_latents(a, b, **({} if dense_limit is None else {"dense_limit": dense_limit}))
    np.testing.assert_array_equal(out["partner_a"], np.argsort(perm))
    np.testing.assert_array_equal(out["partner_b"], perm)
    assert out["summary"]["matched_fraction_a"] == 1.0
    assert np.all(out["match_correlation_a"] > 0.5) and np.all(out["null_match_correlation_a"] < 0.4)


def test_dense_and_sparse_assignments_agree_at_800_latents():
    a, b, planted = synthetic_pair(2000, 800, seed=1)
    corr = correlations(a, b, keep_dense=True)
    dense, sparse = assign(corr, method="dense"), assign(corr, method="sparse")
    assert abs(dense.objective - sparse.objective) <= 1e-3 * dense.objective
    assert sparse.objective <= dense.objective + 1e-9   # the dense one is the optimum
    assert np.mean(dense.partner == sparse.partner) >= 0.99
    # Both report the correlations of the pairs they chose, all positive.
    for m in (dense, sparse):
        chosen = m.partner >= 0
        np.testing.assert_allclose(m.correlation[chosen], corr.dense[chosen, m.partner[chosen]], atol=1e-6)
        assert np.all(m.correlation[chosen] > 0) and not m.correlation[~chosen].any()
    copies = planted >= 0   # B latents that copy an A latent: found back
    assert np.mean(sparse.partner_of_b[copies] == planted[copies]) >= 0.95


def test_independent_data_matches_as_often_as_its_null():
    a, _, _ = synthetic_pair(2000, 400, seed=5)
    b, _, _ = synthetic_pair(2000, 400, seed=6)   # other images' classes: unrelated to A
    s = match_latents(a, b, threshold=0.3, dense_limit=0)["summary"]
    assert 0.05 < s["null_matched_fraction_a"] < 0.5     # rare latents co-fire by chance: the null is hit
    assert abs(s["matched_fraction_a"] - s["null_matched_fraction_a"]) < 0.05
    # Against the same pair with planted shared latents: far above the null.
    a, b, planted = synthetic_pair(2000, 400, shared=0.5, seed=5)
    s = match_latents(a, b, dense_limit=0)["summary"]
    assert s["matched_fraction_a"] > 0.4 and s["null_matched_fraction_a"] < 0.02


def test_unique_latents_are_alive_sorted_and_dead_ones_are_left_out():
    rng = np.random.default_rng(2)
    a, _, _ = synthetic_pair(1000, 50, freq=(0.02, 0.2), seed=7)
    b = a.tolil()
    b[:, 0] = 0.0                                       # B's latent 0 is dead
    b[:, 1] = sparse_acts(rng, 1000, 1, density=0.05)   # B's latent 1 has nothing in common with A
    b = b.tocsr()
    out = match_latents(a, b, unique_below=0.2)
    s = out["summary"]
    assert (s["alive_a"], s["alive_b"]) == (50, 49)
    assert np.isnan(out["best_b"][0]) and out["partner_b"][0] == -1 and np.isnan(out["match_correlation_b"][0])
    assert out["unique_b"].tolist() == [1] and out["best_b"][1] < 0.2
    # A's latents 0 and 1 lost their copies: unique to A, most unique first.
    unique_a = out["unique_a"]
    assert set(unique_a) == {0, 1} and out["best_a"][unique_a[0]] <= out["best_a"][unique_a[1]]
    assert s["unique_a"] == 2 and s["unique_fraction_a"] == 2 / 50
    np.testing.assert_array_equal(out["partner_a"][2:], np.arange(2, 50))
    # The caller's alive mask wins over firing: a latent marked dead is not matched.
    alive = np.ones(50, dtype=bool)
    alive[10] = False
    out = match_latents(a, b, alive_a=alive)
    assert out["summary"]["alive_a"] == 49 and out["partner_a"][10] == -1 and out["partner_b"][10] == -1


def test_user_errors_are_one_line():
    rng = np.random.default_rng(3)
    a, b = sparse_acts(rng, 10, 4), sparse_acts(rng, 11, 4)
    for call in (lambda: correlations(a, b), lambda: match_latents(a, b)):
        with pytest.raises(VisaeError, match=r"different images \(10 rows vs 11\)") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(VisaeError, match="alive_a has shape"):
        match_latents(a, a, alive_a=np.ones(3, dtype=bool))
    with pytest.raises(VisaeError, match="no alive latents"):
        match_latents(a, a, alive_a=np.zeros(4, dtype=bool))
    with pytest.raises(VisaeError, match="keep_dense=True"):
        assign(correlations(a, a), method="dense")


def test_working_memory_bound_at_the_issue_size():
    # 24,576 x 24,576: under a fifth of the 4.8 GB float64 matrix; more A latents add only their top-k.
    full = working_memory_bytes(24_576, 24_576)
    assert 0.5e9 < full < 4.8e9 / 5
    assert working_memory_bytes(2 * 24_576, 24_576) - full == 16 * 24_576 * 128
    assert working_memory_bytes(24_576, 24_576, keep_dense=True) - full == 4 * 24_576 ** 2

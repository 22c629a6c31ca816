"""Representation similarity: debiased CKA against its kernel-form definition and its invariances,
mutual kNN against a brute-force count, the permutation nulls, image-level pooling of a store."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from visae.analysis.similarity import debiased_cka, image_representations, mutual_knn, similarity_rows
from visae.errors import VisaeError
from visae.store import ActivationStore, StoreLayout, StoreMeta, StoreWriter
from visae.tools.synth import synth_store

pytestmark = pytest.mark.usefixtures("one_thread")


def related(rng, n: int = 200, d1: int = 20, d2: int = 30, noise: float = 1.0):
    x = rng.standard_normal((n, d1))
    y = np.tanh(x @ rng.standard_normal((d1, d2))) + noise * rng.standard_normal((n, d2))
    return x, y


def kernel_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al.'s unbiased HSIC written on the n x n kernels, as the paper states it."""
    def hsic(k, l):
        n = len(k)
        k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
        one = np.ones(n)
        return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_debiased_cka_equals_the_kernel_form():
    rng = np.random.default_rng(0)
    x, y = related(rng, n=40)
    value = debiased_cka(x, y)
    assert value == pytest.approx(kernel_cka(x, y), abs=1e-12)
    assert 0.1 < value < 0.9   # related, not identical: the check is not at a trivial value
    # Uncentred input: the same number (the features are centred inside).
    assert debiased_cka(x + 5.0, y - 3.0) == pytest.approx(value, abs=1e-10)


def test_identical_inputs_give_one():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16))
    assert debiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert mutual_knn(x, x, k=10) == 1.0


def test_cka_is_unchanged_by_an_orthogonal_transform_and_an_isotropic_scale():
    rng = np.random.default_rng(2)
    x, y = related(rng)
    base = debiased_cka(x, y)
    q = ortho_group.rvs(x.shape[1], random_state=3)
    assert debiased_cka(x @ q, y) == pytest.approx(base, abs=1e-6)
    assert debiased_cka(x, 7.5 * y) == pytest.approx(base, abs=1e-6)
    assert debiased_cka(0.01 * x @ q, 7.5 * y) == pytest.approx(base, abs=1e-6)
    # A non-isotropic scale does change it (the invariance checked above is not vacuous).
    assert abs(debiased_cka(x * np.linspace(0.1, 10, x.shape[1]), y) - base) > 1e-3


def test_independent_data_gives_cka_near_zero_and_nulls_near_chance():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((500, 40)), rng.standard_normal((500, 60))
    assert abs(debiased_cka(x, y)) < 0.05
    rows = similarity_rows({"L1": x}, {"L2": y}, k=10, seed=0)
    assert abs(rows[0]["cka_null"]) < 0.05
    # Chance overlap of two random 10-neighbour sets among 499 images is 10/499 = 0.02.
    assert rows[0]["mutual_knn"] < 0.06 and rows[0]["mutual_knn_null"] < 0.06


def test_mutual_knn_equals_a_brute_force_count():
    rng = np.random.default_rng(5)
    x, y = related(rng, n=120, noise=0.5)

    def neighbours(f, k):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        sim = f @ f.T
        np.fill_diagonal(sim, -np.inf)
        return [set(np.argsort(-row)[:k]) for row in sim]

    for k in (1, 5):
        nx, ny = neighbours(x, k), neighbours(y, k)
        expected = np.mean([len(a & b) / k for a, b in zip(nx, ny)])
        assert mutual_knn(x, y, k=k, chunk=17) == pytest.approx(expected, abs=1e-12)
    assert 0.05 < mutual_knn(x, y, k=5) < 0.95


def test_similarity_rows_cover_every_layer_pair_with_nulls():
    rng = np.random.default_rng(6)
    x, y = related(rng, n=150, noise=0.3)
    rows = similarity_rows({"2": x, "5": y}, {"2": x, "7": y}, k=5, seed=1)
    assert [(r["layer_a"], r["layer_b"]) for r in rows] == [("2", "2"), ("2", "7"), ("5", "2"), ("5", "7")]
    assert set(rows[0]) == {"layer_a", "layer_b", "n_images", "k", "seed", "cka", "cka_null", "mutual_knn",
                            "mutual_knn_null"}
    same = rows[0]
    assert same["cka"] == pytest.approx(1.0) and same["mutual_knn"] == 1.0 and same["n_images"] == 150
    assert abs(same["cka_null"]) < 0.1 and same["mutual_knn_null"] < 0.15
    assert rows[1]["cka"] == pytest.approx(debiased_cka(x, y)) and rows[1]["cka"] > rows[1]["cka_null"] + 0.2
    perm = np.random.default_rng(1).permutation(150)
    assert rows[1]["mutual_knn_null"] == pytest.approx(mutual_knn(x, y[perm], k=5))
    with pytest.raises(VisaeError, match=r"same images, got shapes \(150, 20\) and \(149, 30\)"):
        similarity_rows({"2": x}, {"7": y[:149]})
    with pytest.raises(VisaeError, match="1 <= k < n"):
        mutual_knn(x, y, k=150)


LAYOUT = StoreLayout(n_cls=1, n_registers=0, grid=(2, 2), stored=("cls", "patches"))  # 5 tokens an image


def cls_patch_store(root, n_images: int = 11, d: int = 6) -> np.ndarray:
    writer = StoreWriter(root, StoreMeta(dtype="float16", d_model=d, layout=LAYOUT), {"test": 1}, 4, n_images)
    writer.open()
    acts = np.random.default_rng(7).standard_normal((n_images, 5, d)).astype(np.float16)
    for i in range(writer.n_shards):
        a, b = writer.shard_range(i)
        writer.write_shard(i, {"acts": acts[a:b], "labels": np.zeros(b - a, dtype=np.int64)})
    return acts.astype(np.float64)


def test_image_representations_pool_patches_or_take_cls(tmp_path):
    acts = cls_patch_store(tmp_path / "s")
    store = ActivationStore(tmp_path / "s")
    images = [9, 0, 3, 4, 10, 5]   # unordered, across shards, more than one chunk
    mean = image_representations(store, images, "mean", chunk=3)
    cls = image_representations(store, images, "cls", chunk=3)
    assert mean.dtype == cls.dtype == np.float32 and mean.shape == cls.shape == (6, 6)
    np.testing.assert_allclose(mean, acts[images, 1:].mean(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cls, acts[images, 0].astype(np.float32))
    assert image_representations(store, [], "mean").shape == (0, 6)
    with pytest.raises(VisaeError, match=r"image indices must lie in \[0, 11\)"):
        image_representations(store, [3, 11], "mean")
    with pytest.raises(VisaeError, match="unknown pool 'max'"):
        image_representations(store, [3], "max")


def test_image_representations_on_a_synth_store(tmp_path):
    root = synth_store(tmp_path / "synth", d=8, atoms=16, k=2, images=20, tokens_per_image=4, shard_images=6)
    store = ActivationStore(root)
    reps = image_representations(store, np.arange(20), "mean", chunk=7)
    assert reps.shape == (20, 8)
    np.testing.assert_allclose(reps, store.images(0, 20).double().mean(dim=1).numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(VisaeError, match="has no cls tokens"):
        image_representations(store, [0], "cls")

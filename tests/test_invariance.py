"""Invariance across domains (visae.analysis.invariance): the shifts, the scores against planted
latents whose answer is known, the baseline, and the real encoder rebuilt from a store."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visae.analysis.invariance import (SHIFTS, _baseline_draws, blur, domain_invariance, edge_sketch,
                                       encoder_from_store, invariance, invert, posterise,
                                       store_to_dataset_index)
from visae.errors import VisaeError

pytestmark = pytest.mark.usefixtures("one_thread")

# Latents of the planted encoder: 0 ignores colour (mean |pixel - image mean|, unchanged by
# inversion), 1 is proportional to brightness, 2 always fires at 1.
N_LATENTS = 3


def planted_encode(calls: list):
    def encode(images):
        calls.append(len(images))
        px = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in images])
        contrast = np.abs(px - px.mean(axis=(1, 2, 3), keepdims=True)).mean(axis=(1, 2, 3))
        return np.stack([contrast, px.mean(axis=(1, 2, 3)), np.ones(len(images))], 1).astype(np.float32)
    return encode


def make_images(seed: int = 0) -> list[Image.Image]:
    """0-9: bright colour images (mean ~0.8); 10-19: dark ones (mean ~0.1)."""
    rng = np.random.default_rng(seed)
    bright = rng.integers(150, 256, size=(10, 8, 8, 3))
    dark = rng.integers(0, 50, size=(10, 8, 8, 3))
    return [Image.fromarray(a.astype(np.uint8), "RGB") for a in np.concatenate([bright, dark])]


def loader(images: list, loads: Counter):
    def load_image(i):
        assert 0 <= i < len(images), f"asked for image {i}"
        loads[i] += 1
        return images[i]
    return load_image


def table(encode, images, tops: list[list[int]]):
    """top_images [h, N] with -1 pads and the encoder's own values as top_values."""
    top_images = np.array(tops, dtype=np.int64)
    acts = encode(images)
    values = np.where(top_images >= 0, acts[np.maximum(top_images, 0), np.arange(len(tops))[:, None]], 0)
    return top_images, values.astype(np.float32)


TOPS = [[0, 1, 2, 3], [4, 5, 6, -1], [7, 8, -1, -1]]


def run(images, tops=TOPS, seed=3, **kw):
    calls, loads = [], Counter()
    encode = planted_encode(calls)
    top_images, top_values = table(planted_encode([]), images, tops)
    kw = {"shifts": ("invert", "grayscale", "blur"), "baseline_images": range(10, 20), "seed": seed,
          "batch_size": 4} | kw
    return invariance(encode, loader(images, loads), top_images, top_values, **kw), calls, loads


def test_colour_blind_latent_survives_inversion_and_brightness_does_not():
    result, _, _ = run(make_images())
    inv = result.shifts["invert"]
    assert inv.scores[0] == 1.0  # inversion leaves mean |pixel - mean| as it was
    assert inv.scores[1] == 0.0  # a bright image (~0.8) inverted (~0.2) is below half of it
    assert inv.scores[2] == 1.0
    assert list(inv.n_valid) == [4, 3, 2]  # pads left out
    assert not inv.identity and inv.n_changed == 9
    # blur keeps the mean: brightness survives it
    assert result.shifts["blur"].scores[1] == 1.0
    summary = result.summary()
    assert summary["shifts"]["invert"]["headline"]["value"] == pytest.approx(2 / 3)
    lo, hi = summary["shifts"]["invert"]["headline"]["low"], summary["shifts"]["invert"]["headline"]["high"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1
    assert summary["shifts"]["invert"]["histogram"]["counts"] == [1] + [0] * 8 + [2]
    assert summary["n_latents_scored"] == 3 and summary["headline_shifts"] == ["invert", "grayscale", "blur"]
    assert result.original_max_rel_deviation < 1e-6 and result.n_original_silent == 0


def test_baseline_is_how_often_a_latent_fires_that_strongly_anyway():
    result, _, _ = run(make_images())
    # baseline draws come from the dark images: brightness never reaches half a bright image's,
    # the constant latent always does
    assert result.baseline.scores[1] == 0.0 and result.baseline.scores[2] == 1.0
    summary = result.summary()
    assert summary["baseline"]["headline"]["n"] == 3
    diff = summary["shifts"]["invert"]["minus_baseline"]["value"]
    assert diff == pytest.approx(np.mean(result.shifts["invert"].scores - result.baseline.scores))


def test_identity_shift_on_grayscale_images_is_flagged_and_kept_out():
    gray = [Image.fromarray(np.asarray(im.convert("L")), "L").convert("RGB") for im in make_images()]
    result, _, _ = run(gray)
    g = result.shifts["grayscale"]
    assert g.identity and g.n_changed == 0
    assert result.headline_shifts == ["invert", "blur"]
    summary = result.summary()
    assert summary["shifts"]["grayscale"]["headline"] is None
    assert summary["shifts"]["grayscale"]["identity"] is True
    assert summary["shifts"]["invert"]["headline"] is not None
    # on colour images it is no identity
    assert not run(make_images())[0].shifts["grayscale"].identity


def test_each_distinct_image_is_loaded_once_and_encoded_once_per_shift():
    tops = [[0, 1, 2], [1, 2, 3], [3, 0, -1]]
    result, calls, loads = run(make_images(), tops=tops, batch_size=3)
    assert set(loads.values()) == {1}
    n_tops = 4
    n_all = len(loads)
    assert n_all >= n_tops and set(range(4)) <= set(loads)
    assert sum(calls) == n_all + 3 * n_tops  # originals of every image, then each shift of the top images
    assert max(calls) <= 3


def test_a_latent_without_top_images_is_unscored():
    result, _, _ = run(make_images(), tops=[[0, 1], [-1, -1], [2, -1]])
    s = result.shifts["invert"]
    assert np.isnan(s.scores[1]) and s.n_valid[1] == 0
    assert result.summary()["n_latents_scored"] == 2
    assert np.isnan(result.per_latent()["baseline"][1])


def test_reproducible_with_the_seed():
    images = make_images()
    a, b = run(images, seed=5)[0].summary(), run(images, seed=5)[0].summary()
    assert json.dumps(a) == json.dumps(b)
    top = np.array([[0, 1, 2, -1], [3, 4, 5, 6]])
    pool = np.arange(0, 10)
    d1 = _baseline_draws(top, pool, np.random.default_rng(1))
    assert np.array_equal(d1, _baseline_draws(top, pool, np.random.default_rng(1)))
    assert not np.array_equal(d1, _baseline_draws(top, pool, np.random.default_rng(2)))
    assert d1[0, 3] == -1 and (d1[top >= 0] != top[top >= 0]).all() and np.isin(d1[top >= 0], pool).all()
    many = _baseline_draws(np.zeros((1, 3000), dtype=np.int64), np.arange(3), np.random.default_rng(0))
    assert set(np.unique(many)) == {1, 2}  # uniform over the others, never the image itself


def test_deviation_from_the_store_is_reported():
    images = make_images()
    top_images, top_values = table(planted_encode([]), images, TOPS)
    top_values[1, 0] *= 1.01
    result = invariance(planted_encode([]), loader(images, Counter()), top_images, top_values,
                        shifts=["invert"], baseline_images=range(20), seed=0)
    assert result.original_max_rel_deviation == pytest.approx(1 / 1.01 * 0.01, rel=1e-3)


def test_bad_inputs_fail_with_one_line():
    images = make_images()
    top_images, top_values = table(planted_encode([]), images, TOPS)
    args = (planted_encode([]), loader(images, Counter()), top_images, top_values)
    kw = {"baseline_images": range(20), "seed": 0}
    with pytest.raises(VisaeError, match="^unknown shift.s. sepia: use some of grayscale, edges, invert"):
        invariance(*args, shifts=["invert", "sepia"], **kw)
    with pytest.raises(VisaeError, match=r"threshold must be in \(0, 1\], got 1.5"):
        invariance(*args, threshold=1.5, **kw)
    with pytest.raises(VisaeError, match="at least 2 images to draw from, got 1"):
        invariance(*args, baseline_images=[3], seed=0)
    with pytest.raises(VisaeError, match=r"must both be \[latents, N\]"):
        invariance(*args[:3], top_values[:, :2], **kw)
    with pytest.raises(VisaeError, match=r"shaped \[4, 2\] for 4 images; expected \[4, 3\]"):
        invariance(lambda ims: np.zeros((len(ims), 2)), *args[1:], batch_size=4, **kw)


def test_the_shifts():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (28, 28, 3)).astype(np.uint8), "RGB")
    a = np.asarray(image).astype(int)
    assert np.array_equal(np.asarray(invert(image)), 255 - a)
    assert set(np.unique(np.asarray(posterise(image)))) <= {0, 64, 128, 192}
    flat = Image.new("RGB", (28, 28), (90, 30, 200))
    assert (np.asarray(edge_sketch(flat))[1:-1, 1:-1] == 255).all()  # no edges: white paper
    square = np.zeros((28, 28, 3), np.uint8)
    square[8:20, 8:20] = 255
    sketch = np.asarray(edge_sketch(Image.fromarray(square)))
    assert sketch[8, 12, 0] < 128 and sketch[14, 14, 0] == 255  # dark outline, white inside
    blurred = np.asarray(blur(Image.fromarray(square))).astype(int)
    assert 0 < blurred[8, 14, 0] < 255 and blurred[14, 14, 0] == 255
    for name, shift in SHIFTS.items():
        out = shift(image)
        assert out.mode == "RGB" and out.size == image.size, name
        assert np.array_equal(np.asarray(out), np.asarray(shift(image))), name  # deterministic


def test_store_index_skips_images_extraction_left_out():
    assert list(store_to_dataset_index(5, None)) == [0, 1, 2, 3, 4]
    assert list(store_to_dataset_index(5, [{"index": 1, "error": "x"}, {"index": 4, "error": "y"}])) == \
        [0, 2, 3, 5, 6]


def test_domain_dataset_scores_the_dominant_class():
    images = make_images()
    # domain images 0-9 bright, 10-19 dark; labels: bright ones class 1, dark ones class 0 and 2
    domain_labels = np.array([1] * 10 + [0] * 5 + [2] * 5)
    top_labels = np.array([[1, 1, 2], [-1, -1, -1], [7, 7, 7]])
    top_values = np.array([[0.8, 0.8, 0.8], [0, 0, 0], [1.0, 1.0, 1.0]], dtype=np.float32)
    loads = Counter()
    calls = []

    def encode(ims):  # latent 0 the brightness, latent 1 never fires, latent 2 always at 1
        acts = planted_encode(calls)(ims)
        return np.stack([acts[:, 1], np.zeros(len(ims)), acts[:, 2]], 1)
    out = domain_invariance(encode, loader(images, loads), domain_labels, top_labels, top_values, seed=0,
                            batch_size=7)
    assert list(out["dominant"]) == [1, -1, 7]
    assert out["scores"][0] == 1.0 and out["baseline"][0] == 0.0  # bright class 1 against dark classes 0, 2
    assert np.isnan(out["scores"][1]) and np.isnan(out["scores"][2]) and list(out["n_images"]) == [10, 0, 0]
    assert set(loads) == set(range(20)) and set(loads.values()) == {1} and max(calls) == 7
    assert out["headline"]["value"] == 1.0 and out["headline"]["n"] == 1
    with pytest.raises(VisaeError, match=r"one class id \(>= 0"):
        domain_invariance(encode, loader(images, loads), [-1, 2], top_labels, top_values, seed=0)


# -- the real encoder, on a store made by `visae extract` ---------------------------------------

TINY = {"source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 28,
        "model_kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}}



def fashion_mnist() -> Path:
    """The fetched copy (resources/fashion-mnist) or Debian's (dataset-fashion-mnist)."""
    for root in (Path(__file__).resolve().parents[1] / "resources" / "fashion-mnist",
                 Path("/usr/share/datasets/fashion-mnist")):
        if (root / "t10k-images-idx3-ubyte.gz").is_file():
            return root
    pytest.skip("Fashion-MNIST is absent: `visae fetch fashion-mnist` or apt-get install -y dataset-fashion-mnist")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, pretrain_checkpoint):
    from visae.extract import plan_extract, run_extract
    from visae.sae import checkpoint as ckpt
    from visae.sae.modules import build_sae, estimate_normalisation
    from visae.store import ActivationStore

    root = tmp_path_factory.mktemp("inv")
    weights = pretrain_checkpoint(root / "pretrain", TINY, 0)
    spec = {"source": "pretrain", "arch": "vit_tiny_patch16_224", "name": "vit-demo", "weights": str(weights)}
    data = {"format": "fashion-mnist", "root": str(fashion_mnist()), "split": "test"}
    plan = plan_extract(spec, data, [1], tokens="all", batch_size=4, max_images=12)
    (store_dir,) = run_extract(plan, root / "acts", num_workers=0, progress=False)
    store = ActivationStore(store_dir)
    tokens = store.images(0, 12)[:, store.token_index("patches")].float()
    sae = build_sae("relu", 32, 64, seed=0)
    sae.set_normalisation(*estimate_normalisation(tokens.reshape(-1, 32)))
    ckpt.save(sae, root / "sae", {"name": "random", "complete": True})
    with torch.no_grad():
        from_store = ckpt.load(root / "sae").encode(tokens).amax(dim=1).numpy()
    moved = root / "moved"
    shutil.move(str(weights.parent), moved)  # the store records the old path: weights= points to the file
    return store_dir, root / "sae", moved / "model.safetensors", from_store, root


def test_encoder_from_store_reproduces_the_store(extracted):
    store_dir, sae_dir, weights, from_store, _ = extracted
    encode, load_image = encoder_from_store(store_dir, sae_dir, weights=weights)
    images = [load_image(i) for i in range(12)]
    assert images[0].size == (28, 28)
    rerun = encode(images)
    assert rerun.dtype == np.float32 and rerun.shape == (12, 64)
    assert (from_store > 0).mean() > 0.2
    np.testing.assert_allclose(rerun, from_store, rtol=2e-3, atol=1e-5)
    # the same through invariance: its original activations against the store's top values
    order = np.argsort(-from_store, axis=0)[:4].T
    top_values = np.take_along_axis(from_store.T, order, 1)
    top_images = np.where(top_values > 0, order, -1)
    result = invariance(encode, load_image, top_images, np.where(top_images >= 0, top_values, 0),
                        shifts=["grayscale", "invert"], baseline_images=range(12), seed=0, batch_size=5)
    assert result.original_max_rel_deviation < 2e-3
    assert result.shifts["grayscale"].identity  # Fashion-MNIST is grey already
    assert not result.shifts["invert"].identity
    with pytest.raises(VisaeError, match=r"^image 12 is not in store .* \(12 images\)$"):
        load_image(12)


def test_encoder_from_store_refuses_another_model(extracted, pretrain_checkpoint):
    store_dir, sae_dir, _, _, root = extracted
    other = pretrain_checkpoint(root / "other", TINY, 1)
    with pytest.raises(VisaeError, match="^the rebuilt model differs from the one that made store .* in "
                                         "weights_sha256 .*pass the weights file"):
        encoder_from_store(store_dir, sae_dir, weights=other)
    with pytest.raises(VisaeError, match="weights file .*does not exist"):
        encoder_from_store(store_dir, sae_dir)  # the recorded path is gone

"""`visae latents`: the latent index checked against a dense computation on the same tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from visae.analysis.latent_index import LatentIndex, build_index
from visae.cli import main
from visae.sae import load, split_images
from visae.store import ActivationStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trained(synth_sae):
    return synth_sae


def held_out(store, sae) -> np.ndarray:
    """The SAE's held-out images, rebuilt from the split its config records."""
    split = load(sae).config["split"]
    return split_images(ActivationStore(store).n_images, split["heldout"], split["seed"])[1]


def dense_image_acts(store_path, sae_path, images):
    store, sae = ActivationStore(store_path), load(sae_path)
    x = torch.stack([store.images(i, i + 1)[0] for i in images]).float()
    with torch.no_grad():
        f = sae.encode(x.reshape(-1, x.shape[-1])).reshape(len(images), x.shape[1], -1)
    value, patch = f.max(dim=1)
    return value.numpy(), patch.numpy(), store.labels[images]


def test_index_matches_a_dense_computation(tmp_path, trained):
    store, sae = trained
    out = tmp_path / "index"
    assert main(["latents", "--store", str(store), "--sae", str(sae), "--out", str(out), "--top", "5"]) == 0
    idx = LatentIndex.load(out)
    held = held_out(store, sae)
    assert np.array_equal(idx.images, held)
    value, patch, labels = dense_image_acts(store, sae, held)
    np.testing.assert_allclose(idx.acts.toarray(), value, rtol=1e-5, atol=1e-6)
    assert idx.acts.nnz == int((value > 0).sum())
    np.testing.assert_allclose(idx.max_activation, value.max(0), rtol=1e-5)
    np.testing.assert_allclose(idx.frequency, (value > 0).mean(0), rtol=1e-6)
    assert idx.top_images.shape == (idx.width, 5)
    for j in range(idx.width):
        fired = np.flatnonzero(value[:, j] > 0)
        order = fired[np.argsort(-value[fired, j], kind="stable")][:5]
        n = len(order)
        assert np.array_equal(idx.top_images[j, :n], held[order])
        np.testing.assert_allclose(idx.top_values[j, :n], value[order, j], rtol=1e-5)
        assert np.array_equal(idx.top_patch[j, :n], patch[order, j])
        assert (idx.top_images[j, n:] == -1).all() and (idx.top_values[j, n:] == 0).all()
    for c in range(4):
        in_c = labels == c
        np.testing.assert_allclose(idx.class_frequency[:, c], (value[in_c] > 0).mean(0), rtol=1e-5)
        np.testing.assert_allclose(idx.class_mean[:, c], value[in_c].mean(0), rtol=1e-4, atol=1e-6)
    top_labels = idx.top_labels
    assert np.array_equal(top_labels[idx.top_images >= 0], (idx.top_images % 4)[idx.top_images >= 0])
    meta = json.loads((out / "index.json").read_text())
    assert meta["identity"]["sae"] == "relu" and meta["pooled_tokens"] == "patches" and meta["top_n"] == 5
    assert (out / "provenance.json").is_file()


def test_small_chunks_and_a_rerun_give_the_same_index(tmp_path, trained):
    store, sae = trained
    _, whole = build_index(store, sae, top_n=4)
    _, chunked = build_index(store, sae, top_n=4, chunk_floats=16 * 64 * 3)  # 3 images per chunk, across shards
    for name in whole:
        assert np.array_equal(whole[name], chunked[name]), name


def test_max_images_takes_a_seeded_sample(trained):
    store, sae = trained
    meta, arrays = build_index(store, sae, max_images=10)
    held = held_out(store, sae)
    assert len(arrays["images"]) == 10 and set(arrays["images"]) <= set(held)
    assert np.array_equal(arrays["images"], build_index(store, sae, max_images=10)[1]["images"])
    assert meta["sample"]["max_images"] == 10 and meta["heldout_images"] == len(held)


def test_a_tampered_index_is_refused(tmp_path, trained, capsys):
    store, sae = trained
    out = tmp_path / "index"
    assert main(["latents", "--store", str(store), "--sae", str(sae), "--out", str(out)]) == 0
    arrays = out / "index.safetensors"
    data = bytearray(arrays.read_bytes())
    data[-1] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(Exception, match="does not match the sha256"):
        LatentIndex.load(out)
    (out / "index.json").unlink()
    with pytest.raises(Exception, match="no finished latent index"):
        LatentIndex.load(out)

"""`visae evaluate`: metrics on the held-out split, checked against a direct float64 computation."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from visae.cli import main
from visae.sae import load, split_images
from visae.store import ActivationStore
from visae.tools.synth import synth_store


# Tiny matmuls: one thread avoids OpenMP hand-off costs on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    store = synth_store(root / "store", d=16, atoms=48, k=3, images=80, tokens_per_image=16, shard_images=32)
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump([
        {"name": "topk", "architecture": "topk", "k": 3, "expansion": 4, "lr": 3e-3, "lr_warmup": 5, "batch_size": 64},
        {"name": "relu", "architecture": "relu", "l1": 3e-2, "expansion": 4, "lr": 3e-3, "lr_warmup": 5,
         "batch_size": 64}]))
    assert main(["train", "--store", str(store), "--grid", str(grid), "--out", str(root / "saes"),
                 "--tokens", "3200", "--heldout", "0.2"]) == 0
    return store, root / "saes"


def test_split_rule():
    train, held = split_images(100, 0.1)
    assert len(train) == 90 and len(held) == 10
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(100))  # disjoint, covering
    assert np.array_equal(held, np.sort(held)) and np.array_equal(split_images(100, 0.1)[1], held)  # seeded
    assert not np.array_equal(split_images(100, 0.1, seed=1)[1], held)
    assert set(split_images(100, 0.05)[1]) < set(held)  # a smaller fraction holds out a subset
    assert len(split_images(5, 0.1)[1]) == 1  # at least one image held out
    assert len(split_images(10, 0.0)[1]) == 0


def test_split_of_a_class_sorted_store_holds_out_every_class():
    """ImageFolder order is sorted by class: the held-out images must not be the last classes."""
    labels = np.repeat(np.arange(20), 50)  # 1,000 images, 20 classes in blocks
    train, held = split_images(len(labels), 0.1)
    held_classes, train_classes = set(labels[held]), set(labels[train])
    assert held_classes <= train_classes
    assert len(held_classes) >= 15, held_classes  # ~uniform: 100 images over 20 classes


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_metrics_match_direct_computation(tmp_path, trained, name):
    store_dir, saes = trained
    out = tmp_path / "ev"
    assert main(["evaluate", "--store", str(store_dir), "--sae", str(saes / name), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "provenance.json").is_file()
    store = ActivationStore(store_dir)
    sae = load(saes / name)
    assert sae.config["split"]["seed"] == 0 and sae.config["split"]["heldout"] == 0.2
    _, held = split_images(store.n_images, 0.2, sae.config["split"]["seed"])
    assert m["heldout"] == 0.2 and m["heldout_images"] == len(held) == 16 and m["source_mismatch"] is None
    x = torch.cat([store.images(i, i + 1) for i in held]).reshape(-1, 16).float()
    with torch.no_grad():
        f = sae.encode(x)
        xhat = sae.decode(f)
    xd, hd = x.double(), xhat.double()
    nmse = ((xd - hd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert m["tokens"] == x.shape[0]
    assert m["nmse"] == pytest.approx(float(nmse), rel=1e-4)
    assert m["explained_variance"] == pytest.approx(1 - float(nmse), rel=1e-4)
    assert m["l0"] == pytest.approx(float((f != 0).sum(1).double().mean()), rel=1e-6)
    if name == "topk":
        assert m["l0"] == 3
    freq = (f != 0).double().mean(0).numpy()
    assert m["dead_fraction"] == pytest.approx(float((freq == 0).mean()))
    assert m["dense_fraction"] == pytest.approx(float((freq > 0.01).mean()))
    with open(out / "latents.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sae.width
    got = np.array([float(r["frequency"]) for r in rows])
    assert np.allclose(got, freq, rtol=1e-6)
    fired = (f != 0)
    mean_act = (f.double().sum(0) / fired.sum(0).clamp_min(1)).numpy()
    assert np.allclose([float(r["mean_activation"]) for r in rows], mean_act, rtol=1e-5, atol=1e-7)
    hist = m["log10_freq_hist"]
    assert sum(hist["counts"]) + hist["never_fired"] == sae.width


def test_heldout_overlapping_training_refused(tmp_path, trained, capsys):
    store_dir, saes = trained
    code = main(["evaluate", "--store", str(store_dir), "--sae", str(saes / "topk"), "--heldout", "0.5",
                 "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "trained on" in err[0]


def test_evaluate_is_repeatable(tmp_path, trained):
    store_dir, saes = trained
    for o in ("a", "b"):
        assert main(["evaluate", "--store", str(store_dir), "--sae", str(saes / "relu"), "--out", str(tmp_path / o)]) == 0
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    assert (tmp_path / "a" / "latents.csv").read_bytes() == (tmp_path / "b" / "latents.csv").read_bytes()


def _copy_store(src: Path, dst: Path, **meta) -> Path:
    """The same activations in a store that says another model or layer made them."""
    from visae.store import StoreMeta, StoreWriter
    store = ActivationStore(src)
    info = store.info
    writer = StoreWriter(dst, StoreMeta(**{"model": info.model, "layer": info.layer, "dataset": info.dataset,
                                           "dtype": info.dtype, "d_model": info.d_model, "layout": info.layout,
                                           **meta}), {"copy": 1}, store.shard_images, store.n_images)
    writer.open()
    for i in range(writer.n_shards):
        a, b = writer.shard_range(i)
        writer.write_shard(i, {"acts": store.images(a, b).numpy(), "labels": store.labels[a:b]})
    return dst


@pytest.mark.parametrize("meta,what", [({"model": "another-vit"}, "model"), ({"layer": 5}, "layer")])
def test_sae_from_another_model_or_layer_refused(tmp_path, trained, capsys, meta, what):
    store_dir, saes = trained
    other = _copy_store(store_dir, tmp_path / "other", **meta)
    out = tmp_path / "ev"
    code = main(["evaluate", "--store", str(other), "--sae", str(saes / "relu"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert f"was trained on another {what} than store" in err[0] and "--allow-mismatch" in err[0], err[0]
    assert not (out / "metrics.json").exists()
    assert main(["evaluate", "--store", str(other), "--sae", str(saes / "relu"), "--out", str(out),
                 "--allow-mismatch"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert f"another {what}" in m["source_mismatch"]
    # the same model and layer, another dataset: no mismatch
    same = _copy_store(store_dir, tmp_path / "same", dataset="another-dataset")
    assert main(["evaluate", "--store", str(same), "--sae", str(saes / "relu"), "--out", str(tmp_path / "ev2")]) == 0
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["source_mismatch"] is None


def _copy_sae(src: Path, dst: Path, **config_changes) -> Path:
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_an_sae_without_a_seeded_split_is_refused(tmp_path, trained, capsys):
    """An SAE from before the seeded split held out the last images: seed 0's held-out images would
    be mostly its training images, so it is refused rather than evaluated on them."""
    store, saes = trained
    cfg = json.loads((saes / "topk" / "config.json").read_text())
    old = _copy_sae(saes / "topk", tmp_path / "old", split={"heldout": 0.2, "train_range": [0, 64]})
    assert main(["evaluate", "--store", str(store), "--sae", str(old), "--out", str(tmp_path / "e")]) == 1
    assert "does not record a seeded held-out split" in capsys.readouterr().err
    assert cfg["split"]["method"] == "seeded permutation of images" and isinstance(cfg["split"]["seed"], int)


def test_a_rerun_removes_the_old_metrics_before_writing_latents(tmp_path, trained, monkeypatch):
    """Killed between latents.csv and metrics.json, a rerun must not leave the earlier run's metrics
    beside the new latents."""
    from visae.analysis import evaluate as ev
    store, saes = trained
    out = tmp_path / "e"
    assert main(["evaluate", "--store", str(store), "--sae", str(saes / "topk"), "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file()
    real = ev.write_json

    def killed(path, obj):
        if Path(path).name == "metrics.json":
            raise KeyboardInterrupt  # stands in for the kill, after latents.csv was replaced
        real(path, obj)

    monkeypatch.setattr(ev, "write_json", killed)
    assert main(["evaluate", "--store", str(store), "--sae", str(saes / "relu"), "--out", str(out)]) == 130
    assert (out / "latents.csv").is_file() and not (out / "metrics.json").exists()


def test_a_moved_weights_file_is_the_same_model(tmp_path, trained):
    """The SAE's model is compared by identity, not by the weights' path or the entry's name."""
    from visae.sae import checkpoint as ckpt
    store_dir, saes = trained
    store = ActivationStore(store_dir)
    sae = load(saes / "topk")
    model = {"name": "a", "weights": "/old/path.safetensors", "identity": {"arch": "x", "weights_sha256": "ab"}}
    sae.config = {**sae.config, "source": {**sae.config["source"], "model": model}}
    store.info = dataclasses.replace(store.info, model={**model, "name": "b", "weights": "/new/path.safetensors"})
    assert ckpt.source_mismatch(sae, store) is None
    store.info = dataclasses.replace(store.info, model={**model, "identity": {"arch": "x", "weights_sha256": "cd"}})
    with pytest.raises(Exception, match="trained on another model"):
        ckpt.source_mismatch(sae, store)

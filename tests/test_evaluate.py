"""`visae evaluate`: metrics on the held-out split, checked against a direct float64 computation."""

from __future__ import annotations

import csv
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
    assert split_images(100, 0.1) == ((0, 90), (90, 100))
    assert split_images(5, 0.1) == ((0, 4), (4, 5))  # at least one image held out
    assert split_images(10, 0.0) == ((0, 10), (10, 10))


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_metrics_match_direct_computation(tmp_path, trained, name):
    store_dir, saes = trained
    out = tmp_path / "ev"
    assert main(["evaluate", "--store", str(store_dir), "--sae", str(saes / name), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "provenance.json").is_file()
    store = ActivationStore(store_dir)
    (_, _), (a, b) = split_images(store.n_images, 0.2)
    assert m["heldout"] == 0.2 and m["heldout_images"] == [a, b]
    x = store.images(a, b).reshape(-1, 16).float()
    sae = load(saes / name)
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

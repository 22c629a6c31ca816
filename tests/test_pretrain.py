"""`visae pretrain` on real Fashion-MNIST, with tiny settings (a 1-2 block ViT, a few steps).

What is checked: the loss goes down and every output is written; the checkpoint loads through the
registry (`source: pretrain`) with the demo's token layout, and the loaded model, fed through its
own preprocessing from the dataset's images, reproduces the accuracy measured at training time
(so extraction sees what training saw); the same seed gives the same weights file bytes; SimCLR
views differ and its loss is finite; bad inputs and NaN losses are one-line errors that leave no
model file behind.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visae import cli
from visae.errors import VisaeError
from visae.models import load_backbone
from visae.pretrain import Pixels, nt_xent, pretrain, simclr_views

FASHION_MNIST_DEB = Path("/usr/share/datasets/fashion-mnist")
TINY = dict(depth=1, embed_dim=32, heads=2, mlp_ratio=2.0, batch_size=32, max_images=256,
            eval_train=128, eval_test=64, init_baseline=False, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(out, fashion_mnist_dir, objective="supervised", **kw):
    args = dict(TINY, steps=30, lr=5e-3, seed=0, data_root=fashion_mnist_dir)
    args.update(kw)
    return pretrain(objective, out, **args)


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    if not (FASHION_MNIST_DEB / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is absent: apt-get install -y dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("sup")
    cfg = _run(out, FASHION_MNIST_DEB, init_baseline=True)
    return out, cfg


def _log(out):
    with open(out / "log.csv") as fh:
        return list(csv.DictReader(fh))


def test_supervised_loss_decreases_and_files_written(supervised_run):
    out, cfg = supervised_run
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "log.csv", "model.safetensors", "provenance.json"]
    rows = _log(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    losses = np.array([float(r["loss"]) for r in rows])
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean() - 0.15
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk["objective"] == "supervised" and on_disk["seed"] == 0
    assert on_disk["model_kwargs"]["patch_size"] == 4 and on_disk["model_kwargs"]["num_classes"] == 10
    m = on_disk["metrics"]
    for key in ("train_loss_last", "head_acc", "knn_acc", "linear_probe_acc", "train_time_s"):
        assert key in m
    assert on_disk["metrics_at_init"]["head_acc"] < m["head_acc"]
    assert m["knn_acc"] > 0.3  # 10 classes: chance is 0.1
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seeds"] == {"seed": 0} and prov["config"]["hyperparameters"]["steps"] == 30


def test_checkpoint_loads_via_registry_and_matches_training(supervised_run, fashion_mnist_dir):
    out, cfg = supervised_run
    spec = {"source": "pretrain", "arch": "vit_tiny_patch16_224", "weights": str(out / "model.safetensors"),
            "image_size": 28, "model_kwargs": cfg["model_kwargs"]}
    assert cfg["model_spec"] == spec
    bb = load_backbone(spec)
    assert bb.layout.n_cls == 1 and bb.layout.n_registers == 0 and bb.layout.grid == (7, 7)
    assert bb.layout.n_tokens == 50 and bb.d_model == 32 and bb.n_layers == 1
    from visae.data import open_dataset

    ds = open_dataset({"format": "fashion-mnist", "root": str(fashion_mnist_dir), "split": "test"})
    n = cfg["hyperparameters"]["eval"]["test_images"]
    px = torch.stack([bb.transform(ds[i].image) for i in range(n)])
    assert px.shape == (n, 3, 28, 28)
    acts = bb.record(px[:4], [-1])[0]
    assert acts.shape == (4, 50, 32)
    # The registry's model, fed from the dataset's own images, scores exactly what training measured.
    with torch.no_grad():
        acc = float((bb.model(px).argmax(1) == torch.from_numpy(ds.label_array()[:n])).float().mean())
    assert round(acc, 4) == cfg["metrics"]["head_acc"]


def test_training_pixels_equal_backbone_transform(fashion_mnist_dir):
    from visae.data import open_dataset

    bb = load_backbone({"source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 28,
                        "model_kwargs": {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}})
    ds = open_dataset({"format": "fashion-mnist", "root": str(fashion_mnist_dir), "split": "test"})
    px = Pixels(bb.transform)
    assert px.fast
    gray = ds.images()[:32]
    got = px.batch(torch.from_numpy(px.geometry_u8(gray)))
    ref = torch.stack([bb.transform(ds[i].image) for i in range(32)])
    assert torch.equal(got, ref)


def test_same_seed_same_bytes(supervised_run, fashion_mnist_dir, tmp_path):
    out, _ = supervised_run
    _run(tmp_path / "again", fashion_mnist_dir, init_baseline=True)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "log.csv").read_bytes() == (out / "log.csv").read_bytes()
    _run(tmp_path / "other", fashion_mnist_dir, seed=1, steps=4)
    _run(tmp_path / "other4", fashion_mnist_dir, seed=0, steps=4)
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != \
        (tmp_path / "other4" / "model.safetensors").read_bytes()


def test_simclr_runs_views_differ(fashion_mnist_dir, tmp_path):
    cfg = _run(tmp_path, fashion_mnist_dir, objective="simclr", steps=6)
    losses = [float(r["loss"]) for r in _log(tmp_path)]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[0] > 0
    assert cfg["model_kwargs"]["num_classes"] == 0 and "head_acc" not in cfg["metrics"]
    assert 0 <= cfg["metrics"]["knn_acc"] <= 1
    bb = load_backbone(cfg["model_spec"])  # projection head is not in the checkpoint
    assert bb.layout.n_tokens == 50
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("head") for k in f.keys())

    gen = torch.Generator().manual_seed(0)
    from visae.data import open_dataset
    ds = open_dataset({"format": "fashion-mnist", "root": str(fashion_mnist_dir), "split": "train"})
    unit = torch.from_numpy(ds.images()[:16].copy()).unsqueeze(1).float().div(255).expand(-1, 3, -1, -1)
    v1, v2 = simclr_views(unit, gen), simclr_views(unit, gen)
    assert v1.shape == unit.shape and v1.min() >= 0 and v1.max() <= 1
    assert torch.equal(v1[:, 0], v1[:, 2])  # still greyscale-as-RGB
    per_image = (v1 - v2).abs().flatten(1).amax(1)
    assert (per_image > 0.1).all()
    again = simclr_views(unit, torch.Generator().manual_seed(0))
    assert torch.equal(again, v1)
    # NT-Xent: matched views give a lower loss than unrelated ones.
    z = torch.randn(8, 16)
    assert nt_xent(z, z + 0.01 * torch.randn(8, 16), 0.2) < nt_xent(z, torch.randn(8, 16), 0.2)


def test_nan_loss_stops_and_leaves_no_model(fashion_mnist_dir, tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"stale")
    monkeypatch.setattr("visae.pretrain.loop.nt_xent", lambda z1, z2, t: (z1.sum() + z2.sum()) * float("nan"))
    with pytest.raises(VisaeError, match=r"loss became nan at step 1 .*lower --lr"):
        _run(tmp_path, fashion_mnist_dir, objective="simclr", steps=3)
    assert not (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob(".model.safetensors*"))


@pytest.mark.parametrize("extra, message", [
    (["--objective", "mae"], "unknown pretraining objective 'mae'"),
    (["--objective", "supervised", "--steps", "0"], "steps must be a positive integer"),
    (["--objective", "simclr", "--steps", "-2"], "steps must be a positive integer"),
    (["--objective", "supervised", "--epochs", "0"], "epochs must be a positive integer"),
    (["--objective", "supervised", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--objective", "supervised", "--embed-dim", "30", "--heads", "4"], "not divisible by heads"),
    (["--objective", "supervised", "--data", "/nonexistent/fmnist"], "/nonexistent/fmnist"),
])
def test_bad_inputs_are_one_line_errors(extra, message, tmp_path, capsys):
    rc = cli.main(["pretrain", "--out", str(tmp_path / "o"), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("visae: error:") and message in err[0], err
    assert not (tmp_path / "o" / "model.safetensors").exists()

"""The task probes (`visae probe`): mIoU and pixel predictions on hand-made inputs, the probe
recipe on features that do and do not separate the classes, the command end to end on both
tasks (deterministic, its files, its refusals), and a segmentation probe on real CamVid masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visae.analysis.probes import LinearProbe, mean_iou, pixel_predictions


def test_mean_iou_on_hand_made_predictions():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 9, 9]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 3]]])
    miou, per_class = mean_iou(pred, target, n_classes=5, ignore_index=9)
    # class 0: tp 1, union 3 (target 2 + pred 2 - 1); class 1: tp 2, union 3; class 2: tp 1, union 2;
    # class 3 and the two "0"s predicted on ignore pixels are not counted; class 4 is in neither
    assert per_class[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(per_class[3]) and math.isnan(per_class[4])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert per_class.shape == (5,) and per_class.dtype == np.float64


def test_mean_iou_counts_a_class_only_predicted_and_keeps_none_ignore():
    target = torch.zeros(1, 2, 2, dtype=torch.int64)
    pred = torch.tensor([[[0, 0], [0, 1]]])
    miou, per_class = mean_iou(pred, target, n_classes=3, ignore_index=None)
    assert per_class[0] == pytest.approx(3 / 4) and per_class[1] == 0.0 and math.isnan(per_class[2])
    assert miou == pytest.approx(3 / 8)
    all_ignored, _ = mean_iou(pred, torch.full((1, 2, 2), 7), n_classes=3, ignore_index=7)
    assert math.isnan(all_ignored)


def test_mean_iou_refuses_labels_out_of_range():
    from visae.errors import VisaeError

    with pytest.raises(VisaeError, match="outside 0..2"):
        mean_iou(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 5), n_classes=3, ignore_index=None)


def _probe(n_classes: int, d: int = 4) -> LinearProbe:
    return LinearProbe("segmentation", torch.zeros(n_classes, d), torch.zeros(n_classes), torch.zeros(d),
                       torch.ones(d), [f"c{i}" for i in range(n_classes)])


def test_pixel_predictions_shapes_and_constant_patches():
    grid, size, c = (2, 3), (8, 12), 4
    logits = torch.full((2, 6, c), -5.0)
    classes = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 3, 3, 3, 3, 3]])
    logits.scatter_(2, classes[..., None], 5.0)  # each patch one class, the same logit across it
    pred = pixel_predictions(_probe(c), logits, grid, size)
    assert pred.shape == (2, 8, 12) and pred.dtype == torch.int64
    assert (pred[1] == 3).all()
    # every patch's centre pixels take its class (bilinear blends only near patch borders)
    for p in range(6):
        r, col = divmod(p, 3)
        assert (pred[0, 4 * r + 1:4 * r + 3, 4 * col + 1:4 * col + 3] == classes[0, p]).all()
    uniform = pixel_predictions(_probe(c), torch.tensor([0.0, 2.0, 1.0, 0.0]).expand(1, 6, c), grid, size)
    assert (uniform == 1).all()


# -- the recipe on features that do / do not separate the classes -------------------------------

def _clusters(n_classes: int, per_class: int, seed: int, d: int = 8, spread: float = 0.05):
    centres = torch.nn.functional.normalize(torch.randn(n_classes, d, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return centres[y] + spread * torch.randn(len(y), d, generator=torch.Generator().manual_seed(seed)), y


def _recipe(train, test, n_classes=4, **kw):
    from types import SimpleNamespace

    from visae.analysis.probes import TaskData, train_task_probe

    layout = SimpleNamespace(layout=SimpleNamespace(grid=(1, 1)), image_size=(1, 1))
    settings = dict(lrs=[1e-2, 1e-1], weight_decays=[1e-4], steps=100, val_fraction=0.25, seed=0) | kw
    return train_task_probe("classification", layout, TaskData(*train), TaskData(*test),
                            [f"c{i}" for i in range(n_classes)], None, **settings)


def test_recipe_separates_separable_features_and_not_shuffled_labels(one_thread):
    train, test = _clusters(4, 40, seed=1), _clusters(4, 10, seed=2)
    probe, result = _recipe(train, test)
    assert result["test_score"] == 1.0 and result["per_class"] == [1.0] * 4
    assert [g["lr"] for g in result["grid"]] == [1e-2, 1e-1] and result["chosen"]["lr"] in (1e-2, 1e-1)
    assert probe.weight.shape == (4, 8) and probe.classes == ["c0", "c1", "c2", "c3"]
    # the probe standardises with the training features' own mean and std
    assert torch.allclose(probe.mean, train[0].mean(0), atol=1e-6)
    shuffled = train[1][torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(3))]
    _, chance = _recipe((train[0], shuffled), test)
    assert chance["test_score"] < 0.6  # chance is 0.25


def test_recipe_is_deterministic_and_leaves_the_rng_alone(one_thread):
    train, test = _clusters(4, 30, seed=4, spread=1.0), _clusters(4, 10, seed=5, spread=1.0)
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    first, r1 = _recipe(train, test)
    assert torch.equal(torch.rand(2), expected)
    second, r2 = _recipe(train, test)
    assert torch.equal(first.weight, second.weight) and r1 == r2


def test_per_class_accuracy_is_null_for_an_absent_class(one_thread):
    train, test = _clusters(4, 30, seed=1), _clusters(4, 10, seed=2)
    keep = test[1] != 3
    _, result = _recipe(train, (test[0][keep], test[1][keep]))
    assert result["per_class"][3] is None and result["per_class"][:3] == [1.0] * 3


def test_random_init_spec_of_a_pretrain_and_a_timm_model(tmp_path):
    import json

    from visae.analysis.probes import random_init_spec

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    saved = {"arch": "vit_tiny_patch16_224", "image_size": 28,
             "model_kwargs": {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "num_classes": 10}}
    (tmp_path / "config.json").write_text(json.dumps({"model_spec": saved}))
    spec = random_init_spec({"name": "m", "source": "pretrain", "arch": "x", "weights": str(weights),
                             "layers": [2]}, init_seed=3)
    assert spec == {"name": "m-random-init", "source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 28,
                    "model_kwargs": saved["model_kwargs"], "pretrained": None, "weights": None, "init_seed": 3}
    from visae.models import load_backbone

    bb = load_backbone(spec)
    assert bb.identity["init_seed"] == 3 and bb.model.num_classes == 10 and bb.layout.grid == (7, 7)
    timm_spec = random_init_spec({"source": "timm", "arch": "vit_small_patch14_dinov2.lvd142m", "pretrained": "lvd142m",
                                  "weights": "w.pth", "crop_pct": 0.875}, init_seed=0)
    assert timm_spec["pretrained"] is None and timm_spec["weights"] is None and timm_spec["crop_pct"] == 0.875


# -- `visae probe` end to end -------------------------------------------------------------------

@pytest.fixture
def fmnist_root():
    from pathlib import Path

    for root in (Path(__file__).resolve().parents[1] / "resources" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")):
        if (root / "t10k-images-idx3-ubyte.gz").is_file():
            return str(root)
    pytest.skip("Fashion-MNIST is absent: `visae fetch fashion-mnist --out resources/fashion-mnist`")


TINY_VIT = {"name": "tiny", "source": "timm", "arch": "vit_tiny_patch16_224", "init_seed": 1,
            "model_kwargs": {"patch_size": 7, "depth": 1, "embed_dim": 16, "num_heads": 2, "mlp_ratio": 2}}


def _probe_cli(task, model, train, test, out, *extra):
    import json

    from visae.cli import main

    return main(["probe", "--task", task, "--model", json.dumps(model), "--train", json.dumps(train),
                 "--test", json.dumps(test), "--out", str(out), "--steps", "15", "--batch-size", "64", *extra])


def _check_probe_dir(out, task, n_classes, n_train, n_test):
    import json

    from visae.layout import PROBE, PROBE_WEIGHTS

    meta = json.loads((out / PROBE).read_text())
    for key in ("task", "classes", "ignore_index", "model", "model_spec", "train", "test", "grid", "chosen",
                "metric", "test_score", "per_class", "random_init", "provenance"):
        assert key in meta, key
    assert meta["task"] == task and meta["metric"] == {"classification": "top1", "segmentation": "miou"}[task]
    assert len(meta["grid"]) == 4 and set(meta["chosen"]) == {"lr", "weight_decay"}
    assert len(meta["train"]["images"]) == n_train and meta["train"]["images"] == sorted(meta["train"]["images"])
    assert len(meta["test"]["images"]) == n_test and set(meta["train"]) == {"dataset", "spec", "images"}
    assert len(meta["per_class"]) == n_classes and len(meta["random_init"]["per_class"]) == n_classes
    assert 0 <= meta["test_score"] <= 1 and 0 <= meta["random_init"]["test_score"] <= 1
    assert meta["random_init"]["init_seed"] == 0
    probe = LinearProbe.load(out)
    assert probe.task == task and probe.weight.shape == (n_classes, 16) and probe.meta["test_score"] == meta["test_score"]
    return meta, (out / PROBE_WEIGHTS).read_bytes()


def test_probe_classification_end_to_end(fmnist_root, tmp_path, capsys, one_thread):
    train = {"format": "fashion-mnist", "root": fmnist_root, "split": "train", "name": "fm-train"}
    test = dict(train, split="test", name="fm-test")
    args = ("--train-images", "80", "--test-images", "40")
    assert _probe_cli("classification", dict(TINY_VIT, image_size=28), train, test, tmp_path / "a", *args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("probe classification tiny on fm-test (40 images): top1 ") and "at random init" in line
    meta, weights = _check_probe_dir(tmp_path / "a", "classification", 10, 80, 40)
    assert meta["model_spec"]["init_seed"] == 1 and meta["model"]["identity"]["init_seed"] == 1
    assert _probe_cli("classification", dict(TINY_VIT, image_size=28), train, test, tmp_path / "b", *args) == 0
    assert (tmp_path / "b" / "probe.safetensors").read_bytes() == weights


def test_probe_segmentation_on_mosaics_end_to_end(fmnist_root, tmp_path, capsys, one_thread):
    train = {"format": "fashion-mnist-mosaic", "root": fmnist_root, "split": "train", "size": 30, "name": "mo-train"}
    test = dict(train, split="test", size=12, name="mo-test")
    model = dict(TINY_VIT, image_size=56)
    assert _probe_cli("segmentation", model, train, test, tmp_path / "a") == 0
    assert "miou" in capsys.readouterr().out
    meta, weights = _check_probe_dir(tmp_path / "a", "segmentation", 11, 30, 12)
    assert meta["classes"][-1] == "background" and meta["ignore_index"] is None
    assert _probe_cli("segmentation", model, train, test, tmp_path / "b") == 0
    assert (tmp_path / "b" / "probe.safetensors").read_bytes() == weights


def test_probe_on_a_supervised_pretrain_model_beats_chance(fmnist_root, tmp_path, one_thread):
    """A tiny supervised `visae pretrain` model (its random-init twin built from its config.json)."""
    import json

    from visae.pretrain import pretrain

    pretrain("supervised", tmp_path / "m", depth=1, embed_dim=16, heads=2, mlp_ratio=2.0, batch_size=64,
             max_images=512, eval_train=64, eval_test=32, init_baseline=False, progress=False, steps=40, lr=5e-3,
             seed=0, data_root=fmnist_root)
    train = {"format": "fashion-mnist", "root": fmnist_root, "split": "train"}
    model = {"name": "sup", "source": "pretrain", "arch": "vit_tiny_patch16_224"}
    assert _probe_cli("classification", model, train, dict(train, split="test"), tmp_path / "p",
                      "--weights", str(tmp_path / "m" / "model.safetensors"), "--train-images", "300",
                      "--test-images", "200", "--lrs", "0.01", "0.1", "--steps", "150") == 0
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["test_score"] > 0.2  # chance is 0.1 (a 40-step model: no claim it beats random init)
    assert meta["random_init"]["spec"]["source"] == "timm" and meta["random_init"]["test_score"] is not None


@pytest.mark.parametrize("task, train_changes, test_changes, message", [
    ("segmentation", {}, {}, "a segmentation probe needs masks and the train dataset"),
    ("classification", {"format": "fashion-mnist-mosaic", "size": 4}, {"format": "fashion-mnist-mosaic", "size": 4},
     "needs image labels and the train dataset"),
    ("classification", {}, {"segmentation": True}, "have different class lists"),
    ("classification", {"size": 3}, {}, "unknown key(s) size for dataset format fashion-mnist"),
])
def test_probe_bad_inputs_are_one_line(fmnist_root, tmp_path, capsys, task, train_changes, test_changes, message):
    train = {"format": "fashion-mnist", "root": fmnist_root, "split": "train"}
    test = dict(train, split="test")
    assert _probe_cli(task, dict(TINY_VIT, image_size=28), dict(train, **train_changes), dict(test, **test_changes),
                      tmp_path / "p", "--train-images", "8", "--test-images", "4") == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p" / "probe.json").exists()


def test_probe_refuses_an_empty_sample_and_removes_a_stale_marker(fmnist_root, tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "probe.json").write_text("{}")
    train = {"format": "fashion-mnist", "root": fmnist_root, "split": "train"}
    assert _probe_cli("classification", dict(TINY_VIT, image_size=28), train, train, tmp_path / "p",
                      "--train-images", "0") == 1
    assert "must be a positive integer, got '0'" in capsys.readouterr().err
    assert _probe_cli("classification", dict(TINY_VIT, image_size=28), train, dict(train, split="nope"),
                      tmp_path / "p") == 1
    assert not (tmp_path / "p" / "probe.json").exists()


def test_segmentation_probe_on_real_camvid_masks(camvid_dir, tmp_path, one_thread):
    import json

    data = {"format": "segfolder", "layout": "camvid", "root": str(camvid_dir), "split": "val"}
    model = dict(TINY_VIT, image_size=28)
    assert _probe_cli("segmentation", model, data, data, tmp_path / "p", "--train-images", "10",
                      "--test-images", "6") == 0
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["ignore_index"] == 11 and len(meta["classes"]) == 11 and len(meta["per_class"]) == 11
    assert 0.0 <= meta["test_score"] <= 1.0 and math.isfinite(meta["test_score"])
    assert all(v is None or 0.0 <= v <= 1.0 for v in meta["per_class"])
    probe = LinearProbe.load(tmp_path / "p")
    assert probe.ignore_index == 11 and probe.weight.shape == (11, 16)  # void is no class of the probe

"""`visae intervene`: the change-rate arithmetic on hand-made predictions, a constructed model in
which one latent carries a class, and end-to-end runs of both tasks on a tiny ViT."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from visae.analysis import intervene as iv
from visae.analysis.probes import LinearProbe, task_batches
from visae.cli import main
from visae.data.base import Sample
from visae.models import load_backbone
from visae.sae.modules import build_sae

pytestmark = pytest.mark.usefixtures("one_thread")

D = 32
TINY = {"source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 28,
        "model_kwargs": {"patch_size": 4, "depth": 3, "embed_dim": D, "num_heads": 2}}


# -- the arithmetic ---------------------------------------------------------------------------------

def test_change_rates_on_hand_made_predictions():
    before = np.array([2, 2, 2, 2, 0, 1, 1, 0])
    after = np.array([2, 0, 1, 2, 0, 1, 2, 0])
    target, other = iv.change_rates(before, after, 2)
    assert target == pytest.approx(2 / 4) and other == pytest.approx(1 / 4)
    assert iv.change_counts(before, after, 2) == (2, 4, 1, 4)
    t, o = iv.change_rates(before, after, 5)  # nothing predicted 5 before
    assert math.isnan(t) and o == pytest.approx(3 / 8)
    assert iv.change_rates(before.reshape(2, 4), after.reshape(2, 4), 2) == (target, other)  # patches of images


def test_flip_rate_counts_only_predictions_that_were_not_the_target():
    before = np.array([0, 0, 0, 3, 0])
    after = np.array([3, 3, 0, 3, 1])
    assert iv.flip_rate(before, after, 3) == pytest.approx(2 / 4)
    assert math.isnan(iv.flip_rate(np.array([3]), np.array([3]), 3))


def test_selectivity_is_own_rate_minus_the_best_other():
    rate = np.array([[0.9, 0.1, 0.2], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(iv.selectivity(rate), [[0.7, -0.8, -0.7], [0.0, 0.0, -0.5], [0, 0, 0]])


def test_best_f1_over_thresholds_and_eligible_latents():
    # 2 thresholds, 3 latents, 2 classes; latent 0 is ineligible (too frequent)
    tp = np.zeros((2, 3, 2))
    n_pred = np.array([[10.0, 8, 4], [10, 4, 2]])
    tp[0, 0, 0] = 10  # the best F1 for class 0, but ineligible
    tp[0, 1, 0], tp[1, 1, 0] = 4, 4  # latent 1: F1 8/18 at t0, 8/14 at t1
    tp[0, 2, 1] = 4  # latent 2 at t0: F1 8/(4+5)
    n_true = np.array([10.0, 5.0])
    latent, thr, f1 = iv.best_f1(tp, n_pred, n_true, np.array([False, True, True]))
    assert latent.tolist() == [1, 2] and thr.tolist() == [1, 0]
    np.testing.assert_allclose(f1, [8 / 14, 8 / 9])


def test_matched_random_latents_avoid_the_chosen_and_are_seeded():
    freq = np.array([0.1, 0.11, 0.5, 0.12, 0.0, 0.09, 0.3])
    alive = freq > 0
    a = iv.matched_random_latents([0, 2], freq, alive, np.random.default_rng(0), n=2)
    b = iv.matched_random_latents([0, 2], freq, alive, np.random.default_rng(0), n=2)
    assert a == b
    assert a[0] in (1, 5) and a[1] in (6, 3)  # the two nearest in frequency, never 0, 2 or the dead 4


def test_mean_std_leaves_nan_out():
    assert iv.mean_std([1.0, 3.0, math.nan]) == {"mean": 2.0, "std": 1.0}
    assert iv.mean_std([math.nan]) == {"mean": None, "std": None}


# -- a constructed model: latent k carries class k -------------------------------------------------

class ListDataset:
    """Images in memory with their labels (what task_batches reads)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.has_masks, self.name, self.ignore_index = False, "constructed", None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Sample(self.images[i], int(self.labels[i]))


def test_suppressing_the_latent_that_carries_a_class_lowers_that_class_only():
    bb = load_backbone(TINY)
    last = bb.n_layers - 1
    with torch.no_grad():  # the blocks after layer 1 add nothing, the final norm is the identity:
        for block in bb.model.blocks[2:]:  # the probe reads the CLS token as layer 1 writes it
            for p in (block.attn.proj.weight, block.attn.proj.bias, block.mlp.fc2.weight, block.mlp.fc2.bias):
                p.zero_()
    bb.final_norm = torch.nn.Identity()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(120)]
    pixels = torch.stack([bb.transform(im) for im in images])
    cls = bb.record(pixels, [1])[1][:, 0]  # [N, d]
    mu = cls.mean(0)
    u = torch.linalg.svd(cls - mu, full_matrices=False).Vh[:2]  # two orthonormal directions the data varies along
    s = (cls - mu) @ u.T  # [N, 2]
    t, gap = s.quantile(0.5, dim=0), 0.5 * s.std(0)
    fires, clear = s > t, s > t + gap  # images that fire only just are left out
    keep = ~(fires[:, 0] & fires[:, 1]) & ~(fires & ~clear).any(1)
    labels = torch.where(fires[:, 0], 0, torch.where(fires[:, 1], 1, 2))[keep].numpy()
    images = [im for im, k in zip(images, keep) if k]
    # the SAE: latent k = ReLU(u_k . (x - mu) - t_k), decoded along u_k; latents 2..5 never fire
    sae = build_sae("relu", D, 6, seed=0).eval()
    other = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.set_normalisation(mu, 1.0)
        sae.W_enc.zero_()
        sae.W_enc[:, :2] = u.T
        sae.W_dec[:2] = u
        sae.W_dec[2:] = other / other.norm(dim=1, keepdim=True)
        sae.b_enc.copy_(torch.tensor([-t[0], -t[1], -1e6, -1e6, -1e6, -1e6]))
        sae.b_dec.zero_()
    # the probe: logit_k = a_k (u_k . (z - mu) - t_k) for k = 0, 1; logit_2 = 0.1
    a = (6 / s.std(0)).unsqueeze(1)
    weight = torch.cat([a * u, torch.zeros(1, D)])
    bias = torch.cat([-a[:, 0] * (u @ mu + t), torch.full((1,), 0.1)])
    probe = LinearProbe("classification", weight, bias, torch.zeros(D), torch.ones(D), ["a", "b", "none"])
    index = SimpleNamespace(alive=np.ones(6, bool), frequency=np.array([0.3, 0.3, 0.1, 0.1, 0.1, 0.1]),
                            max_activation=np.array([float(s[:, 0].max() - t[0]), float(s[:, 1].max() - t[1]),
                                                     1.0, 1.0, 1.0, 1.0], dtype=np.float32),
                            meta={"pooled_tokens": "patches"})
    data = ListDataset(images, labels)
    src = iv.Sources(index, None, sae, probe, bb, 1, data, data, np.arange(len(images)), np.arange(len(images)),
                     torch.float32, "cpu")
    plan = iv.Plan(latents=[0, 1, 2], random_latents=[3, 4, 5],
                   directions=torch.eye(D)[:3], max_activation=index.max_activation, insert_targets=[[1], [0], [0]])
    run = iv.run_classification(src, plan, suppress_scale=0.0, insert_scale=1.0, scales=[0.0, 1.0], where="cls",
                                batch_size=32)
    assert last == 2 and (run.pred0 == labels).mean() > 0.95
    table, dose, part = iv.classification_tables(run, plan, probe.classes, suppress_scale=0.0, insert_scale=1.0,
                                                 scales=[0.0, 1.0])
    row = table[(table["class"] == 0) & (table.method == "latent")].iloc[0]
    assert row.p_before > 0.6 and row.delta_prob < -0.3 and row.acc_after < 0.1
    assert row.other_delta_acc == 0
    # on every image of the other classes the class-0 edit changes no probability
    pos, pred, prob = run.results[("suppress", 0, "latent", 0.0, None)]
    other = labels[pos] != 0
    np.testing.assert_allclose(prob[other], run.probs0[pos[other], 0], atol=1e-5)
    assert (pred[other] == run.pred0[pos[other]]).all()
    # a random latent that never fires changes nothing; inserting class 1's latent flips class 0 to it
    assert table[(table["class"] == 0) & (table.method == "random_latent")].iloc[0].delta_prob == pytest.approx(0, abs=1e-6)
    assert row.flip_rate > 0.5
    # the chosen latents beat both baselines by far on average; three classes are too few for the
    # bootstrap interval to clear zero, so the finding stays cautious
    margins = part["finding"]["margins"]
    assert margins["random_latent"]["value"] > 0.1 and margins["random_direction"]["value"] > 0.1


def test_the_finding_needs_margins_clear_of_the_spread_over_classes():
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(0, 0.01, 10)  # noqa: E731
    clear = iv.finding("segmentation", {"latent": 0.5 + noise(), "random_latent": noise(), "random_direction": noise()},
                       seed=0)
    assert clear["moves_more_than_baselines"] is True
    assert clear["margins"]["random_latent"]["low"] > 0.4 and "moves its target more than both" in clear["text"]
    # a mean ahead of one baseline but within the classes' spread is not a win
    close = iv.finding("segmentation", {"latent": 0.004 + noise(), "random_latent": noise(),
                                        "random_direction": noise()}, seed=0)
    assert close["moves_more_than_baselines"] is False and "does not clearly move" in close["text"]
    # classification compares sizes: a large increase counts as much as a large decrease
    sized = iv.finding("classification", {"latent": np.r_[-0.5, 0.5] .repeat(5) + noise(),
                                          "random_latent": noise(), "random_direction": noise()}, seed=0)
    assert sized["moves_more_than_baselines"] is True


# -- end to end on a tiny ViT ---------------------------------------------------------------------

def _fashion_mnist():
    from pathlib import Path

    for root in (Path(__file__).resolve().parents[1] / "resources" / "fashion-mnist",
                 Path("/usr/share/datasets/fashion-mnist")):
        if (root / "t10k-images-idx3-ubyte.gz").is_file():
            return root
    pytest.skip("Fashion-MNIST is absent: `visae fetch fashion-mnist` or apt-get install -y dataset-fashion-mnist")



def _probe(bb, task, spec, train_images, test_images, out):
    """A ridge-regression probe on the final tokens, saved as `visae probe` saves one."""
    from visae.data import open_dataset
    from visae.data.patches import patch_labels

    ds = open_dataset(spec)
    lay = bb.layout
    feats, targets = [], []
    for pixels, labels, masks in task_batches(ds, train_images, bb, 64):
        tokens = bb.final_tokens(pixels)
        if task == "classification":
            feats.append(tokens[:, 0])
            targets.append(labels)
        else:
            feats.append(tokens[:, lay.n_prefix:].reshape(-1, bb.d_model))
            targets.append(torch.from_numpy(np.concatenate(
                [patch_labels(m.numpy(), lay.grid, ds.ignore_index, ds.patch_vote) for m in masks]).astype(np.int64)))
    x, y = torch.cat(feats), torch.cat(targets)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    C = len(ds.classes)
    onehot = torch.nn.functional.one_hot(y, C).float()
    a = torch.cat([xs, torch.ones(len(xs), 1)], 1)
    w = torch.linalg.solve(a.T @ a + 1e-1 * torch.eye(a.shape[1]), a.T @ onehot)
    part = lambda images: {"dataset": ds.describe(), "spec": spec, "images": sorted(int(i) for i in images)}  # noqa: E731
    meta = {"model": bb.to_dict(), "model_spec": TINY, "train": part(train_images), "test": part(test_images),
            "metric": "top1" if task == "classification" else "miou", "test_score": 0.5,
            "random_init": {"test_score": 0.1, "per_class": [], "init_seed": 0}}
    LinearProbe(task, w[:-1].T.contiguous(), w[-1].contiguous(), mean, std, list(ds.classes), ds.ignore_index,
                meta).save(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, pretrain_checkpoint):
    """A tiny pretrain-style ViT, its store at layer 1 (48 Fashion-MNIST test images), an SAE
    trained on it, the SAE's latent index and both probes."""
    import yaml

    from visae.extract import plan_extract, run_extract

    root = tmp_path_factory.mktemp("intervene")
    weights = pretrain_checkpoint(root / "pretrain", TINY, 0)
    spec = {"source": "pretrain", "arch": "vit_tiny_patch16_224", "name": "vit-demo", "image_size": 28,
            "weights": str(weights)}
    data = {"format": "fashion-mnist", "root": str(_fashion_mnist()), "split": "test"}
    plan = plan_extract(spec, data, [1], tokens="all", batch_size=16, max_images=48)
    (store_dir,) = run_extract(plan, root / "acts", num_workers=0, progress=False)
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"name": "topk", "architecture": "topk", "k": 4, "expansion": 4,
                                     "lr": 3e-3, "lr_warmup": 5, "batch_size": 128}]))
    assert main(["train", "--store", str(store_dir), "--grid", str(grid), "--out", str(root / "saes"),
                 "--tokens", "6000", "--heldout", "0.5"]) == 0
    assert main(["latents", "--store", str(store_dir), "--sae", str(root / "saes" / "topk"),
                 "--out", str(root / "index")]) == 0
    bb = load_backbone(spec)
    seg = {**data, "segmentation": True}
    _probe(bb, "classification", data, np.arange(100, 160), np.arange(200, 240), root / "probe-cls")
    _probe(bb, "segmentation", seg, np.arange(100, 140), np.arange(200, 224), root / "probe-seg")
    return SimpleNamespace(root=root, spec=spec, weights=weights, store=store_dir, index=root / "index")


def _run(tiny, task, out, *extra):
    model = json.dumps({k: v for k, v in tiny.spec.items() if k != "weights"})
    probe = tiny.root / ("probe-cls" if task == "classification" else "probe-seg")
    return main(["intervene", "--task", task, "--index", str(tiny.index), "--probe", str(probe), "--model", model,
                 "--weights", str(tiny.weights), "--layer=1", "--out", str(out), "--scales", "-1", "0", "1",
                 "--batch-size", "16", "--examples", "2", *extra])


def test_classification_end_to_end(tiny, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "cls"
    (out).mkdir()
    (out / "intervention.json").write_text("{}")  # a stale marker: removed before anything is written
    assert _run(tiny, "classification", out, "--insert-targets", "2") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("topk classification: Suppressing") and line.endswith(str(out))
    result = json.loads((out / "intervention.json").read_text())
    assert result["methods"] == list(iv.CLASSIFICATION_METHODS)
    for key in ("task", "identity", "model", "dataset", "layer", "sae", "sae_sha256", "index", "probe", "methods",
                "n_classes", "n_images", "scales", "config", "provenance", "suppress_scale", "insert_scale", "tokens",
                "suppression", "insertion", "accuracy_before", "finding"):
        assert key in result, key
    assert result["identity"]["sae"] == "topk" and result["layer"] == 1 and result["n_images"] == 40
    assert set(result["suppression"]["latent"]) == {"delta_prob", "delta_acc", "other_delta_acc"}
    assert set(result["insertion"]["random_direction"]["flip_rate"]) == {"mean", "std"}
    assert result["probe"] == {"dir": str(tiny.root / "probe-cls"), "metric": "top1", "test_score": 0.5,
                               "random_init_score": 0.1}
    assert isinstance(result["finding"]["moves_more_than_baselines"], bool)
    classes = pd.read_csv(out / "classes.csv")
    assert list(classes.columns) == iv.CLASSIFICATION_COLUMNS and len(classes) == 10 * 4
    assert classes[classes.method == "random_direction"].latent.isna().all()
    assert classes[classes.method == "latent"].latent.notna().all()
    dose = pd.read_csv(out / "dose.csv")
    assert list(dose.columns) == ["method", "scale", "delta_prob_mean", "delta_prob_std", "delta_acc_mean",
                                  "delta_acc_std"]
    assert len(dose) == 4 * 3
    with safe_open(str(out / "examples.safetensors"), "np") as f:
        assert json.loads(f.metadata()["classes"])[0] == "T-shirt/top" and f.metadata()["task"] == "classification"
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert t["image"].shape == (2, 28, 28, 3) and t["image"].dtype == np.uint8
    assert t["heatmap"].shape == (2, 7, 7) and t["probs_after"].shape == (2, 10)
    assert t["class"].dtype == np.int64 and t["latent"].dtype == np.int64
    # the same run again gives the same bytes
    again = tmp_path / "again"
    assert _run(tiny, "classification", again, "--insert-targets", "2") == 0
    for name in ("classes.csv", "dose.csv", "examples.safetensors"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_segmentation_end_to_end(tiny, tmp_path):
    out = tmp_path / "seg"
    assert _run(tiny, "segmentation", out, "--scale", "-1", "--max-frequency", "0.5",
                "--latents-json", '{"Bag": 3}') == 0
    result = json.loads((out / "intervention.json").read_text())
    assert result["methods"] == ["latent", "manual", "random_latent", "random_direction"]
    assert result["mode"] == "auto+manual" and result["thresholds"] == [0, 0.1, 0.3, 1.0]
    assert set(result["rates"]["latent"]) == {"target_change", "other_change", "miou_after"}
    assert 0 <= result["miou_before"] <= 1
    classes = pd.read_csv(out / "classes.csv")
    assert list(classes.columns) == iv.SEGMENTATION_COLUMNS
    manual = classes[classes.method == "manual"]
    assert manual.class_name.tolist() == ["Bag"] and manual.latent.tolist() == [3]
    assert classes[classes.method == "latent"].f1.notna().all() and manual.f1.isna().all()
    dose = pd.read_csv(out / "dose.csv")
    assert list(dose.columns) == ["method", "scale", "target_change_mean", "target_change_std", "other_change_mean",
                                  "other_change_std"]
    from safetensors.numpy import load_file

    t = load_file(str(out / "examples.safetensors"))
    assert t["pred_before"].shape == (2, 28, 28) and t["pred_after"].dtype == np.int64


def test_bad_inputs_are_one_line(tiny, tmp_path, capsys, pretrain_checkpoint):
    def fails(match, *extra, task="classification"):
        assert _run(tiny, task, tmp_path / "bad", *extra) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(match, err.removeprefix("visae: error: ")), err

    fails(r"^--latents-json gives latent 999 for 'Bag', out of range for an SAE of 128 latents",
          "--latents-json", '{"Bag": 999}', task="segmentation")
    fails(r"^--latents-json names class 'Hat'", "--latents-json", '{"Hat": 1}', task="segmentation")
    fails(r"^--scales must be finite numbers, got nan", "--scales", "nan")
    fails(r"^probe .* is a classification probe, not --task segmentation",
          "--probe", str(tiny.root / "probe-cls"), task="segmentation")
    fails(r"trained on block 1 \(store 1\), not --layer 0 \(block 0\)", "--layer=0")
    other = pretrain_checkpoint(tiny.root / f"other-{tmp_path.name}", TINY, 1)
    fails(r"^the rebuilt model differs from the one that made store", "--weights", str(other))
    assert not (tmp_path / "bad" / "intervention.json").exists()


def test_edited_forward_equals_final_tokens_with_the_edit():
    bb = load_backbone(TINY)
    pixels = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    fwd = iv.EditedForward(bb, 1)
    plain = fwd.start(pixels)
    assert fwd.blocks_alone is True
    torch.testing.assert_close(plain, bb.final_tokens(pixels), rtol=1e-5, atol=1e-5)
    sae = build_sae("relu", D, 64, seed=0).eval()
    edit = iv.LatentEdit(sae, [1, 5], [3.0, 0.0], iv.token_mask(bb.layout, "patches"))
    rows = torch.tensor([0, 3])
    torch.testing.assert_close(fwd.edited(edit, rows), bb.final_tokens(pixels[rows], edit=edit, layer=1),
                               rtol=1e-5, atol=1e-5)


def test_a_probe_of_another_model_is_refused(tiny, tmp_path, capsys):
    import shutil

    probe = tmp_path / "probe"
    shutil.copytree(tiny.root / "probe-cls", probe)
    meta = json.loads((probe / "probe.json").read_text())
    meta["model"]["identity"]["init_seed"] = 7
    (probe / "probe.json").write_text(json.dumps(meta))
    assert _run(tiny, "classification", tmp_path / "out", "--probe", str(probe)) == 1
    assert re.match(r"visae: error: probe .* was trained on another model than --model \(they differ in init_seed\)",
                    capsys.readouterr().err)

"""`visae report browser` on a small real tree: two tiny ViTs on 64 Fashion-MNIST images, a TopK SAE
and its second seed on each, their latent indexes, the cross-model and seed comparisons, a profile;
a hand-written intervention and SAEBench file (their readers only take identity and a few columns).
The emitted data are checked against the indexes; the DAG's browser is checked in headless Chromium
by tests/test_workflow.py (tests/chromium.py)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from visae.args import Parser
from visae.cli import main
from visae.errors import VisaeError
from visae.report import browser

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 28,
        "model_kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}}
TOP = 6


def _fashion_mnist() -> Path:
    for root in (Path(__file__).resolve().parents[1] / "resources" / "fashion-mnist",
                 Path("/usr/share/datasets/fashion-mnist")):
        if (root / "t10k-images-idx3-ubyte.gz").is_file():
            return root
    pytest.skip("Fashion-MNIST is absent: `visae fetch fashion-mnist` or apt-get install -y dataset-fashion-mnist")


def build(out, tree, *extra, **changes) -> int:
    """`visae report browser` over the tree (through its own parser: the report CLI imports every part)."""
    argv = {"indexes": [str(p) for p in tree.indexes.values()], "matchings": [str(p) for p in tree.matchings],
            "profiles": [str(tree.profile)], "interventions": [str(tree.intervention)],
            "saebench": [str(tree.saebench)], "datasets": [json.dumps(tree.dataset)]} | changes
    args = []
    for k, v in argv.items():
        args += [f"--{k}", *v]
    parser = Parser(prog="visae report browser")
    browser.add_arguments(parser)
    return browser.run(parser.parse_args([*args, "--top", str(TOP), "--out", str(out), *extra]))


@pytest.fixture(scope="module")
def tree(tmp_path_factory, pretrain_checkpoint):
    import yaml

    from visae.extract import plan_extract, run_extract

    root = tmp_path_factory.mktemp("browser")
    data = {"format": "fashion-mnist", "root": str(_fashion_mnist()), "split": "test"}
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"name": n, "architecture": "topk", "k": 4, "expansion": 4, "lr": 3e-3,
                                     "lr_warmup": 5, "batch_size": 128} for n in ("topk", "topk.seed1")]))
    indexes, specs = {}, {}
    for model, seed in (("tiny-a", 0), ("tiny-b", 1)):
        weights = pretrain_checkpoint(root / model / "pretrain", TINY, seed)
        spec = {**TINY, "source": "pretrain", "name": model}
        specs[model] = (spec, weights)
        plan = plan_extract({**spec, "weights": str(weights)}, {**data, "name": "fmnist-test"}, [1],
                            tokens="all", batch_size=32, max_images=64)
        (store,) = run_extract(plan, root / model / "acts", num_workers=0, progress=False)
        assert main(["train", "--store", str(store), "--grid", str(grid), "--out", str(root / model / "saes"),
                     "--tokens", "3000", "--heldout", "0.5"]) == 0
        for sae in ("topk", "topk.seed1"):
            out = root / model / "latents" / sae
            assert main(["latents", "--store", str(store), "--sae", str(root / model / "saes" / sae),
                         "--out", str(out)]) == 0
            indexes[(model, sae)] = out
    matchings = []
    for name, a, b in (("cross", ("tiny-a", "topk"), ("tiny-b", "topk")),
                       ("seed", ("tiny-a", "topk"), ("tiny-a", "topk.seed1"))):
        assert main(["compare", "--a", str(indexes[a]), "--b", str(indexes[b]), "--out", str(root / name)]) == 0
        matchings.append(root / name / "matching.json")
    spec, weights = specs["tiny-a"]
    assert main(["profile", "--index", str(indexes[("tiny-a", "topk")]), "--out", str(root / "profile"),
                 "--model", json.dumps(spec), "--weights", str(weights), "--shifts", "grayscale", "invert",
                 "--invariance-latents", "64"]) == 0
    identity = json.loads((indexes[("tiny-a", "topk")] / "index.json").read_text())["identity"]
    from visae.analysis.latent_index import LatentIndex

    chosen = int(np.argmax(LatentIndex.load(indexes[("tiny-a", "topk")]).frequency))
    iv = root / "intervention"
    iv.mkdir()
    pd.DataFrame({"class": [3, 3, 3], "class_name": ["Dress"] * 3,
                  "method": ["latent", "random_latent", "random_direction"], "latent": [chosen, 0, None],
                  "n_images": [9, 9, 9], "delta_prob": [-0.25, -0.01, 0.02], "flip_rate": [0.0, 0.0, 0.0]}).to_csv(
        iv / "classes.csv", index=False)
    (iv / "intervention.json").write_text(json.dumps({"task": "classification", "identity": identity,
                                                      "dataset": "fmnist-test", "finding": {"text": "a finding"}}))
    bench = root / "saebench.json"
    bench.write_text(json.dumps({"format": "visae-saebench/1", "identity": identity, "metrics": {
        "l0": 4.0, "sparse_probing_k1": 0.6, "sparse_probing_floor_k1": 0.3, "sparse_probing_ceiling": 0.9,
        "tpp": 0.2, "tpp_random": 0.01, "stability": None, "stability_random": None}}))
    tree = SimpleNamespace(root=root, indexes=indexes, matchings=matchings, profile=root / "profile" / "profile.json",
                           intervention=iv / "intervention.json", saebench=bench, chosen=chosen,
                           dataset={**data, "name": "fmnist-test"})
    tree.out = root / "results" / "browser"
    assert build(tree.out, tree) == 0
    return tree


def read_js(path: Path) -> tuple[str, dict]:
    m = re.fullmatch(r'VISAE\.put\(("[^"]*"), (.*)\);\n', path.read_text(), re.S)
    assert m, f"{path} is not one VISAE.put(name, object) call"
    return json.loads(m.group(1)), json.loads(m.group(2))


def _emitted(out: Path, sae: dict) -> dict:
    """An SAE's chunks joined over latents."""
    joined: dict = {}
    for c in range(sae["chunks"]):
        name, d = read_js(out / "data" / sae["key"] / f"latents_{c:03d}.js")
        assert name == f"latents/{sae['key']}/{c}" and d["start"] == c * sae["chunk"]
        heat = np.frombuffer(zlib.decompress(base64.b64decode(d["heat"])), dtype=np.uint8)
        joined.setdefault("heat", []).append(heat.reshape(d["count"], d["top"], -1))
        for k in ("images", "slots", "values", "patch", "hist", "zeros", "class_frequency", "interventions"):
            joined.setdefault(k, []).extend(d[k])
        joined.setdefault("matches", []).append(d["matches"])
    joined["heat"] = np.concatenate(joined["heat"])
    return joined


def test_emitted_data_match_the_indexes(tree):
    from visae.analysis.latent_index import LatentIndex

    out = tree.out
    assert (out / "index.html").is_file() and (out / "provenance.json").is_file()
    name, manifest = read_js(out / "data" / "manifest.js")
    assert name == "manifest" and len(manifest["saes"]) == 4
    by = {(s["model"], s["sae"]): s for s in manifest["saes"]}
    images = manifest["image_sets"]["fmnist-test"]
    shown = np.unique(np.concatenate([LatentIndex.load(p).top_images[:, :TOP].reshape(-1)
                                      for p in tree.indexes.values()]))
    shown = shown[shown >= 0]
    assert images["images"] == len(shown) and images["cell"] == 28 and images["format"] == "png"
    for (model, sae_name), path in tree.indexes.items():
        idx, s = LatentIndex.load(path), by[(model, sae_name)]
        assert s["top"] == TOP and s["grid"] == [7, 7] and s["width"] == idx.width == 128
        e = _emitted(out, s)
        top_images = idx.top_images[:, :TOP]
        assert np.array_equal(e["images"], top_images)
        slots = np.asarray(e["slots"])
        assert np.array_equal(np.where(top_images >= 0, shown[np.maximum(slots, 0)], -1), top_images)
        values = np.asarray([[np.nan if v is None else v for v in row] for row in e["values"]])
        np.testing.assert_allclose(values, idx.top_values[:, :TOP], rtol=1e-3)
        assert np.array_equal(e["patch"], idx.top_patch[:, :TOP])
        # heatmaps: re-encoded from the store, their arg-max is the index's top patch
        heat = browser.heatmaps(idx, TOP).reshape(idx.width, TOP, -1)
        valid = (top_images >= 0) & (idx.top_values[:, :TOP] > 0)
        assert valid.sum() > 100
        assert np.array_equal(heat.argmax(-1)[valid], idx.top_patch[:, :TOP][valid])
        np.testing.assert_allclose(heat.max(-1)[valid], idx.top_values[:, :TOP][valid], rtol=1e-4)
        q = e["heat"]
        at = np.take_along_axis(q, np.maximum(idx.top_patch[:, :TOP], 0)[..., None], -1)[..., 0]
        assert (at[valid] == q.max(-1)[valid]).all() and (q[~valid] == 0).all()
        expect = np.rint(255 * idx.top_values[:, :TOP] / np.maximum(idx.max_activation, 1e-30)[:, None])
        assert np.abs(at[valid] - expect[valid]).max() <= 1
        assert (at[idx.alive, 0] == 255).all()
        # histograms of the index's image-level matrix
        acts = idx.acts.tocsc()
        for j in range(idx.width):
            col = acts.data[acts.indptr[j]:acts.indptr[j + 1]]
            counts = np.histogram(col, bins=browser.HIST_BINS, range=(0, float(idx.max_activation[j])))[0] \
                if len(col) else np.zeros(browser.HIST_BINS)
            assert e["hist"][j] == counts.tolist() and e["zeros"][j] + sum(e["hist"][j]) == len(idx.images)
        np.testing.assert_allclose(np.asarray(e["class_frequency"], dtype=float), idx.class_frequency, rtol=5e-3)
        name, table = read_js(out / "data" / s["key"] / "table.js")
        assert table["rows"] == idx.width
        np.testing.assert_allclose(table["data"]["frequency"], idx.frequency, rtol=1e-3)
        np.testing.assert_allclose(table["data"]["max_activation"], idx.max_activation, rtol=1e-3)
    # the comparisons: each side's matches, linked to the other SAE's pages
    a = by[("tiny-a", "topk")]
    assert [c["label"] for c in a["comparisons"]] == ["tiny-b", "seed twin"]
    assert a["comparisons"][0]["other"] == by[("tiny-b", "topk")]["key"] and a["comparisons"][0]["cross_model"]
    assert a["comparisons"][1]["other"] == by[("tiny-a", "topk.seed1")]["key"]
    rows = pd.read_csv(tree.matchings[0].parent / "matches.csv")
    _, table = read_js(out / "data" / a["key"] / "table.js")
    for side, s in (("a", a), ("b", by[("tiny-b", "topk")])):
        _, t = read_js(out / "data" / s["key"] / "table.js")
        want = rows[rows.side == side].sort_values("latent")
        assert t["data"]["match_0"] == want["match"].fillna(-1).astype(int).tolist()
        got = np.asarray([np.nan if v is None else v for v in t["data"]["match_r_0"]])
        np.testing.assert_allclose(got, want.matched_correlation, rtol=1e-3)
        assert _emitted(out, s)["matches"][0][0]["match"] == want["match"].fillna(-1).astype(int).tolist()[:64]
    assert [c["label"] for c in by[("tiny-a", "topk.seed1")]["comparisons"]] == ["seed twin"]
    assert by[("tiny-b", "topk.seed1")]["comparisons"] == []
    # the profile, the intervention and SAEBench land on their SAE only
    profile = pd.read_csv(tree.profile.parent / "profile_latents.csv")
    np.testing.assert_allclose(np.asarray(table["data"]["purity"], dtype=float), profile.purity, rtol=1e-3)
    assert {"invariance", "invariance_baseline", "intervened"} <= set(table["data"])
    assert table["data"]["intervened"][tree.chosen] == "Dress (classification)"
    (entry,) = _emitted(out, a)["interventions"][tree.chosen]
    assert entry["class_name"] == "Dress" and entry["order"] == ["latent", "random_latent", "random_direction"]
    assert entry["methods"]["latent"]["delta_prob"] == -0.25 and entry["methods"]["random_latent"]["latent"] == 0
    assert [r["name"] for r in a["saebench"]] == ["l0", "sparse_probing_k1", "tpp", "stability"]
    assert a["saebench"][1]["baseline"] == 0.3 and a["saebench"][1]["ceiling"] == 0.9
    assert by[("tiny-b", "topk")]["saebench"] is None and "purity" not in read_js(
        out / "data" / by[("tiny-b", "topk")]["key"] / "table.js")[1]["data"]


def test_each_shown_image_sits_once_in_the_sprite_sheets(tree):
    from PIL import Image, ImageOps

    from visae.data import open_dataset

    _, manifest = read_js(tree.out / "data" / "manifest.js")
    s = manifest["saes"][0]
    e = _emitted(tree.out, s)
    dataset = open_dataset(tree.dataset)  # the store's images are the dataset's first 64, none skipped
    images = manifest["image_sets"]["fmnist-test"]
    cell, side = images["cell"], images["side"]
    assert (cell, side) == (28, 16)  # never upscaled; as many as fit in 512 px
    for slot, image in list(zip(np.ravel(e["slots"]), np.ravel(e["images"])))[:40:7]:
        if image < 0:
            continue
        sheet = Image.open(tree.out / images["sheets"][slot // side ** 2])
        assert sheet.mode == "L"
        r, c = divmod(slot % side ** 2, side)
        crop = np.asarray(sheet)[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
        want = np.asarray(ImageOps.fit(dataset[int(image)].image.convert("RGB"), (cell, cell)))[..., 0]
        assert np.array_equal(crop, want)


def test_many_classes_chart_the_ones_a_latent_fires_on_most():
    freq = np.zeros((2, 30), dtype=np.float32)
    freq[0, [3, 7, 29]] = [0.5, 0.1, 0.9]
    freq[1] = np.linspace(0, 1, 30)
    shown = browser.shown_classes(SimpleNamespace(class_frequency=freq), 0, 2)
    assert shown[0] == [3, 7, 29] and shown[1] == list(range(10, 30))
    assert browser.shown_classes(SimpleNamespace(class_frequency=freq[:, :5]), 0, 2) == [[0, 1, 2, 3, 4]] * 2


def test_a_rebuild_gives_the_same_bytes(tree, tmp_path):
    again = tmp_path / "browser"
    assert build(again, tree) == 0
    (again / "data" / "stale.js").write_text("")  # a rebuild replaces the whole folder
    assert build(again, tree) == 0
    assert not (again / "data" / "stale.js").exists() and not list(tmp_path.glob(".browser.*"))
    files = sorted(p.relative_to(tree.out) for p in tree.out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        if f.name != "provenance.json":
            assert (tree.out / f).read_bytes() == (again / f).read_bytes(), f


def test_bad_inputs_are_one_line_and_leave_no_finished_browser(tree, tmp_path):
    out = tmp_path / "browser"
    shutil.copytree(tree.out, out)
    missing = {k: v for k, v in tree.indexes.items() if k != ("tiny-a", "topk")}
    with pytest.raises(VisaeError, match=r"profile file .* is about tiny-a/fmnist-test/layer_1/topk, which none of "
                                         r"--indexes is"):
        build(out, tree, indexes=[str(p) for p in missing.values()], matchings=[], interventions=[], saebench=[])
    assert not (out / "index.html").exists() and not list(tmp_path.glob(".browser.*.tmp"))
    stale = tmp_path / "stale"
    stale.mkdir()
    p = json.loads(tree.profile.read_text())
    p["identity"]["store_hash"] = "0" * 64
    (stale / "profile.json").write_text(json.dumps(p))
    shutil.copy(tree.profile.parent / "profile_latents.csv", stale)
    with pytest.raises(VisaeError, match="was made on another store than latent index tiny-a"):
        build(out, tree, profiles=[str(stale / "profile.json")])
    with pytest.raises(VisaeError, match=r"--datasets entry 'fmnist-test' has split='train'"):
        build(out, tree, datasets=[json.dumps({**tree.dataset, "split": "train"})])
    with pytest.raises(VisaeError, match="holds other images than the store the indexes were built on"):
        build(out, tree, datasets=[json.dumps({**tree.dataset, "root": str(_relabelled(tmp_path / "other"))})])
    assert not list(tmp_path.glob(".browser.*.tmp"))


def _relabelled(dst: Path) -> Path:
    """Fashion-MNIST's test split with its labels reversed: the same file names, other images."""
    import gzip

    src = _fashion_mnist()
    dst.mkdir()
    (dst / "t10k-images-idx3-ubyte.gz").symlink_to(src / "t10k-images-idx3-ubyte.gz")
    raw = bytearray(gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[8:] = bytes(reversed(raw[8:]))
    (dst / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw), mtime=0))
    return dst


def test_a_store_without_images_gets_placeholders(synth_sae, tmp_path):
    store, sae = synth_sae
    index = tmp_path / "index"
    assert main(["latents", "--store", str(store), "--sae", str(sae), "--out", str(index), "--top", "4"]) == 0
    parser = Parser(prog="visae report browser")
    browser.add_arguments(parser)
    assert browser.run(parser.parse_args(["--indexes", str(index), "--out", str(tmp_path / "b")])) == 0
    _, manifest = read_js(tmp_path / "b" / "data" / "manifest.js")
    (s,) = manifest["saes"]
    images = manifest["image_sets"][s["dataset"]]
    assert images["has_images"] is False and images["cell"] == 8 and s["top"] == 4 and s["comparisons"] == []
    assert (tmp_path / "b" / "index.html").is_file() and (tmp_path / "b" / images["sheets"][0]).is_file()

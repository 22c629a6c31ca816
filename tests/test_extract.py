"""`visae extract` on real architectures (random init) and real images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visae.cli import main
from visae.data import open_dataset, patch_labels
from visae.errors import VisaeError
from visae.extract import plan_extract, run_extract
from visae.models import load_backbone
from visae.store import ActivationStore, verify_store
from visae.store.writer import StoreWriter
from visae.store.format import META_DIGEST, meta_digest

REPO = Path(__file__).resolve().parents[1]
DINO = {"source": "timm", "arch": "vit_base_patch14_reg4_dinov2", "image_size": 224}
CLIP = {"source": "open_clip", "arch": "ViT-B-16"}
TINY = {"source": "timm", "arch": "vit_tiny_patch16_224"}


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    return load_backbone(DINO)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_backbone(CLIP)


def test_dinov2_registers_store_equals_model_outputs(tmp_path, cifar10_dir, dino):
    spec = {"format": "imagefolder", "root": str(cifar10_dir)}
    plan = plan_extract(DINO, spec, [3, -1], tokens="all", batch_size=3, max_images=7, shard_images=4,
                        backbone=dino)
    paths = run_extract(plan, tmp_path, progress=False)
    assert [p.name for p in paths] == ["layer_3", "layer_-1"]
    dataset = open_dataset(spec)
    pixels = torch.stack([dino.transform(dataset[i].image) for i in range(7)])
    expected = dino.record(pixels, [3, 11])
    for layer, path in zip([3, 11], paths):
        store = ActivationStore(path)
        meta = store.info.to_dict()
        # registers are dropped by default: CLS then the 16x16 patch grid
        assert meta["layout"]["stored"] == ["cls", "patches"]
        assert meta["layout"]["n_tokens"] == 1 + 256 and meta["layout"]["grid"] == [16, 16]
        assert meta["layout"]["model"]["n_registers"] == 4
        assert meta["layer"] == layer and meta["n_shards"] == 2 and meta["dtype"] == "float16"
        assert meta["layer_requested"] == (3 if layer == 3 else -1)
        keep = [0] + list(range(5, 261))
        want = expected[layer][:, keep].to(torch.float16)
        assert torch.equal(store.images(0, 7), want)
        assert np.array_equal(store.labels, dataset.label_array()[:7])
        assert verify_store(path) == []
        assert (path / "provenance.json").is_file()


def test_one_forward_pass_serves_every_layer(tmp_path, cifar10_dir, dino, monkeypatch):
    calls = []
    original = dino.record
    monkeypatch.setattr(dino, "record", lambda px, layers: calls.append(list(layers)) or original(px, layers))
    plan = plan_extract(DINO, {"format": "imagefolder", "root": str(cifar10_dir)}, [1, 2, -1],
                        batch_size=2, max_images=4, backbone=dino)
    run_extract(plan, tmp_path, progress=False)
    assert calls == [[1, 2, 11], [1, 2, 11]]


def test_clip_camvid_patch_labels(tmp_path, camvid_dir, clip):
    spec = {"format": "camvid", "root": str(camvid_dir)}
    plan = plan_extract(CLIP, spec, [-2], tokens="patches", batch_size=2, max_images=3, backbone=clip,
                        dtype="bf16")
    (path,) = run_extract(plan, tmp_path, progress=False)
    store = ActivationStore(path)
    assert list(store.info.layout.stored) == ["patches"] and store.info.layout.n_tokens == 196
    assert store.dtype == torch.bfloat16 and store.images(0, 3).shape == (3, 196, 768)
    assert store.patch_labels.shape == (3, 196) and store.patch_labels.dtype == np.int16
    dataset = open_dataset(spec)
    for i in range(3):
        mask = dataset[i].mask
        want = patch_labels(clip.mask_transform(mask), (14, 14), 11)
        assert np.array_equal(store.patch_labels[i], want)
    assert set(np.unique(store.patch_labels)) <= set(range(12))
    cls_only = torch.cat(list(__import__("visae.store", fromlist=["TokenLoader"]).TokenLoader(
        store, 10, token_kind="patches", patch_labels=[int(store.patch_labels[0, 0])], drop_last=False)))
    assert len(cls_only) == int((store.patch_labels == store.patch_labels[0, 0]).sum())


def test_fashion_mnist_cls_tokens(tmp_path, fashion_mnist_dir):
    spec = {"format": "fashion-mnist", "root": str(fashion_mnist_dir), "split": "test"}
    plan = plan_extract(TINY, spec, [5], tokens="cls", batch_size=8, max_images=16)
    (path,) = run_extract(plan, tmp_path, progress=False)
    store = ActivationStore(path)
    assert store.images(0, 16).shape == (16, 1, 192)
    assert list(store.labels) == list(open_dataset(spec).label_array()[:16])


def _extract_cmd(out: Path, cifar: Path) -> list[str]:
    return [sys.executable, "-m", "visae.cli", "extract", "--model", "timm:vit_tiny_patch16_224",
            "--dataset", f"imagefolder:{cifar}", "--layers", "2", "-1", "--max-images", "24",
            "--batch-size", "4", "--shard-images", "4", "--workers", "0", "--no-progress", "--out", str(out)]


def test_resume_after_sigkill_is_byte_identical(tmp_path, cifar10_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    ref = tmp_path / "ref"
    subprocess.run(_extract_cmd(ref, cifar10_dir), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    for attempt in range(2):  # kill twice, at different points
        proc = subprocess.Popen(_extract_cmd(killed, cifar10_dir), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = 1 + 2 * attempt
        deadline = time.time() + 120
        while time.time() < deadline:
            meta = killed / "layer_-1" / "meta.json"
            try:
                if len(json.loads(meta.read_text())["shards"]) >= target:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert json.loads((killed / "layer_-1" / "meta.json").read_text())["complete"] is False
    subprocess.run(_extract_cmd(killed, cifar10_dir), check=True, env=env, capture_output=True)
    for layer in ("layer_2", "layer_-1"):
        names = sorted(p.name for p in (ref / layer).glob("*.npy"))
        assert names == sorted(p.name for p in (killed / layer).glob("*.npy")) and len(names) == 12
        for name in names:
            assert (ref / layer / name).read_bytes() == (killed / layer / name).read_bytes(), name
        assert verify_store(killed / layer) == []
        assert not list((killed / layer).glob(".*"))


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visae: error: "), err
    return err[0]


def test_bad_inputs_fail_with_one_line_and_no_output(tmp_path, capsys, cifar10_dir, imagenet_sample_dir):
    out = tmp_path / "out"
    base = ["extract", "--layers", "1", "--max-images", "4", "--no-progress", "--out", str(out)]
    tiny = ["--model", "timm:vit_tiny_patch16_224"]
    cifar = ["--dataset", f"imagefolder:{cifar10_dir}"]

    line = _one_line_error(capsys, base + tiny + ["--dataset", f"imagefolder:{tmp_path / 'nope'}"])
    assert "nope" in line
    line = _one_line_error(capsys, base + ["--model", "timm:vit_tiny_patch16_2244"] + cifar)
    assert "vit_tiny_patch16_2244" in line
    line = _one_line_error(capsys, ["extract", "--layers", "12", "--out", str(out)] + tiny + cifar)
    assert "layer 12 is out of range" in line and "0..11" in line
    line = _one_line_error(capsys, base + tiny + cifar + ["--dtype", "fp8"])
    assert "unknown dtype 'fp8'" in line
    line = _one_line_error(capsys, base + tiny + cifar + ["--precision", "fp8"])
    assert "--precision invalid choice: 'fp8'" in line and "'auto', 'fp32', 'tf32', 'bf16', 'fp16'" in line
    assert not out.exists()

    # a corrupt JPEG: the file is named and no store is left behind
    folder = tmp_path / "imgs" / "n01"
    folder.mkdir(parents=True)
    jpgs = sorted(imagenet_sample_dir.glob("*.JPEG"))[:3]
    for jpg in jpgs:
        (folder / jpg.name).write_bytes(jpg.read_bytes())
    bad = folder / jpgs[1].name
    bad.write_bytes(bad.read_bytes()[:600])
    line = _one_line_error(capsys, base + tiny + ["--dataset", f"imagefolder:{tmp_path / 'imgs'}"])
    assert jpgs[1].name in line
    assert not (out / "layer_1" / "meta.json").exists() and not list(out.rglob("*.npy"))

    # a truncated shard is named by verify and refused by the reader
    assert main(["extract", "--layers", "1", "--max-images", "4", "--shard-images", "2", "--no-progress",
                 "--out", str(out)] + tiny + cifar) == 0
    shard = out / "layer_1" / "acts_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["verify", str(out / "layer_1")]) == 1
    assert "acts_00001.npy: checksum mismatch" in capsys.readouterr().err
    with pytest.raises(Exception, match="acts_00001.npy is truncated"):
        ActivationStore(out / "layer_1")


# --- fidelity: fp16 range, the model's identity, the patch vote --------------------------------

SMALL = {"source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 32,
         "model_kwargs": {"patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}}


def _grey_then_real(root: Path, cifar: Path) -> dict:
    """An image folder: two flat grey images (pixels at the model's mean: no patch signal), then
    four real photos."""
    folder = root / "imgs" / "c"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (128, 128, 128)).save(folder / f"a{i}.png")
    for i, jpg in enumerate(sorted(cifar.glob("*/*.jpg"))[:4]):
        (folder / f"b{i}.jpg").write_bytes(jpg.read_bytes())
    return {"format": "imagefolder", "root": str(root / "imgs")}


def test_fp16_overflow_is_refused_and_leaves_no_store(tmp_path, cifar10_dir, monkeypatch):
    # block 2's MLP scaled up: the residual stream overflows float16 from layer 2 on, not before
    bb = load_backbone(SMALL)
    with torch.no_grad():
        bb.model.blocks[2].mlp.fc2.weight.mul_(1e7)
    spec = _grey_then_real(tmp_path, cifar10_dir)
    plan = plan_extract(SMALL, spec, [1, 2], batch_size=2, max_images=2, backbone=bb)
    with pytest.raises(VisaeError) as err:
        run_extract(plan, tmp_path / "a", progress=False, num_workers=0)
    msg = str(err.value)
    assert msg.startswith("layer 2 of vit_tiny_patch16_224 has activations up to ")
    assert msg.endswith("beyond float16's ±65,504: extract with dtype bf16 or fp32 "
                        "(--dtype, or dtype: under extract: in the config)") and "\n" not in msg
    assert not (tmp_path / "a").exists()
    # in an fp16 forward pass the same block overflows inside the model (NaN from there on),
    # whatever the store's dtype
    plan = plan_extract(SMALL, spec, [1, 2], batch_size=2, max_images=2, dtype="bf16", backbone=bb)
    with pytest.raises(VisaeError) as err:
        run_extract(plan, tmp_path / "c", precision="fp16", progress=False, num_workers=0)
    assert str(err.value) == ("layer 2 of vit_tiny_patch16_224 has NaN activations: the fp16 forward pass overflowed "
                              "float16's ±65,504; extract with precision bf16 or fp32 "
                              "(--precision, or precision: under extract: in the config)")
    assert not (tmp_path / "c").exists()

    # the patch embedding scaled up instead: the grey images fit, the photos overflow, so the
    # first shard is finished before the second fails, and it goes too (it can never be completed)
    bb = load_backbone(SMALL)
    with torch.no_grad():
        bb.model.patch_embed.proj.weight.mul_(1e5)
        bb.model.patch_embed.proj.bias.zero_()
    out = tmp_path / "b"
    plan = plan_extract(SMALL, spec, [-1], batch_size=2, shard_images=2, max_images=4, backbone=bb)
    written = []
    write_shard = StoreWriter.write_shard
    monkeypatch.setattr(StoreWriter, "write_shard", lambda w, i, a: written.append(i) or write_shard(w, i, a))
    with pytest.raises(VisaeError, match="^layer -1 of vit_tiny_patch16_224 has activations up to"):
        run_extract(plan, out, progress=False, num_workers=0)
    assert written == [0] and not out.exists()
    # bf16 holds them
    plan = plan_extract(SMALL, spec, [-1], batch_size=2, shard_images=2, max_images=4, dtype="bf16", backbone=bb)
    (path,) = run_extract(plan, out, progress=False, num_workers=0)
    acts = ActivationStore(path).images(0, 4).float()
    assert torch.isfinite(acts).all() and acts.abs().max() > 65504 and verify_store(path) == []


def _interrupted(plan, out: Path, after_calls: int, precision: str = "auto") -> None:
    """Run an extraction that is stopped (as by Ctrl-C) after `after_calls` forward passes."""
    record, calls = plan.backbone.record, []

    def stop(px, layers):
        if len(calls) == after_calls:
            raise KeyboardInterrupt
        calls.append(1)
        return record(px, layers)

    plan.backbone.record = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            run_extract(plan, out, precision=precision, progress=False, num_workers=0)
    finally:
        del plan.backbone.record


def test_resume_refuses_a_store_made_by_another_model(tmp_path, cifar10_dir):
    import hashlib

    from safetensors.torch import save_file

    files = {}
    for seed in (0, 1):  # two weights files for the same architecture
        torch.manual_seed(seed)
        tiny = load_backbone({**SMALL, "init_seed": seed})
        files[seed] = tmp_path / f"w{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(files[seed]))
    spec = _grey_then_real(tmp_path, cifar10_dir)

    def plan(weights):
        return plan_extract({**SMALL, "weights": str(weights)}, spec, [2], batch_size=2, max_images=6,
                            shard_images=2)

    ref = run_extract(plan(files[0]), tmp_path / "ref", progress=False)[0]
    out = tmp_path / "out"
    _interrupted(plan(files[0]), out, after_calls=1)
    meta = json.loads((out / "layer_2" / "meta.json").read_text())
    assert meta["complete"] is False and len(meta["shards"]) == 1
    identity = meta["model"]["identity"]
    assert identity["weights_sha256"] == hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert identity["init_seed"] is None and identity["activation"] == "GELU"
    assert meta["model"]["weights"] == str(files[0])

    # other weights: refused, one line, and the partial store is left as it was
    before = {p.name: p.read_bytes() for p in (out / "layer_2").iterdir()}
    with pytest.raises(VisaeError) as err:
        run_extract(plan(files[1]), out, progress=False)
    assert str(err.value) == (f"{out / 'layer_2'} holds a store made by another model (different weights_sha256): "
                              f"remove it or choose another output folder")
    assert {p.name: p.read_bytes() for p in (out / "layer_2").iterdir()} == before

    # the same weights, moved: resumes at shard 1 and ends as the uninterrupted run
    moved = tmp_path / "moved.safetensors"
    files[0].rename(moved)
    resumed = plan(moved)
    calls = []
    record = resumed.backbone.record
    resumed.backbone.record = lambda px, layers: calls.append(1) or record(px, layers)
    (path,) = run_extract(resumed, out, progress=False)
    assert len(calls) == 2  # shards 1 and 2 only
    for name in sorted(p.name for p in ref.glob("*.npy")):
        assert (ref / name).read_bytes() == (path / name).read_bytes(), name
    assert json.loads((path / "meta.json").read_text())["model"]["weights"] == str(moved)
    # a finished store is not reused by another model either (nor by another random init)
    with pytest.raises(VisaeError, match="made by another model \\(different weights_sha256\\)"):
        run_extract(plan(files[1]), out, progress=False)
    with pytest.raises(VisaeError, match="made by another model \\(different init_seed, weights_sha256\\)"):
        run_extract(plan_extract(SMALL, spec, [2], batch_size=2, max_images=6, shard_images=2), out, progress=False)
    # a store from before identities were recorded is not taken as this model's
    meta = json.loads((path / "meta.json").read_text())
    del meta["model"]["identity"]
    meta[META_DIGEST] = meta_digest(meta)  # re-sealed, as a store written before identities was
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VisaeError, match="made by another model \\(the store records no model identity\\)"):
        run_extract(plan(moved), out, progress=False)


def test_paper_patch_vote_reaches_the_store(tmp_path, camvid_dir, clip):
    spec = {"format": "camvid", "root": str(camvid_dir), "patch_vote": "all-pixel-mode"}
    plan = plan_extract(CLIP, spec, [1], batch_size=2, max_images=2, backbone=clip)
    (path,) = run_extract(plan, tmp_path, progress=False)
    store = ActivationStore(path)
    assert store.info.dataset["patch_vote"] == "all-pixel-mode"
    dataset = open_dataset(spec)
    differ = 0
    for i in range(2):
        mask = clip.mask_transform(dataset[i].mask)
        assert np.array_equal(store.patch_labels[i], patch_labels(mask, (14, 14), 11, "all-pixel-mode"))
        differ += int((store.patch_labels[i] != patch_labels(mask, (14, 14), 11)).sum())
    assert differ > 0  # CamVid's void pixels win some patches under the paper's vote
    # the CLI's --patch-vote sets the same dataset key
    import argparse

    from visae.extract import resolve_dataset_spec
    args = argparse.Namespace(dataset=f"camvid:{camvid_dir}", split=None, patch_vote="all-pixel-mode", config=None)
    assert resolve_dataset_spec(args) == {"format": "camvid", "root": str(camvid_dir), "patch_vote": "all-pixel-mode"}


# --- the forward pass's precision --------------------------------------------------------------

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_autocast_is_close_to_fp32_and_recorded(tmp_path, cifar10_dir):
    spec = {"format": "imagefolder", "root": str(cifar10_dir)}
    # 10 images in shards of 4 (the last one short), batches of 3: host buffers are reused
    plan = plan_extract(SMALL, spec, [1, -1], dtype="fp32", batch_size=3, max_images=10, shard_images=4)
    stores = {p: run_extract(plan, tmp_path / p, precision=p, progress=False, num_workers=0)
              for p in ("fp32", "bf16", "fp16", "auto")}
    dataset = open_dataset(spec)
    pixels = torch.stack([plan.backbone.transform(dataset[i].image) for i in range(10)])
    expected = plan.backbone.record(pixels, [1, 3])
    for i, layer in enumerate([1, 3]):
        fp32, bf16, fp16, auto = (ActivationStore(stores[p][i]) for p in ("fp32", "bf16", "fp16", "auto"))
        assert torch.equal(fp32.images(0, 10), expected[layer][:, plan.token_idx])  # the model's own outputs
        # on CPU auto is fp32: the same files as before the option, and no precision recorded
        for name in sorted(q.name for q in stores["fp32"][i].glob("*.npy")):
            assert (stores["fp32"][i] / name).read_bytes() == (stores["auto"][i] / name).read_bytes()
        assert "precision" not in fp32.info.job and auto.info.job == fp32.info.job
        assert bf16.info.job == fp32.info.job | {"precision": "bf16"}
        # bf16 rounds every matmul's inputs to 8 significant bits (relative 2^-8 = 0.0039); a few
        # blocks deep that stays about there (0.003 measured), well under 0.02; fp32 would be 0.
        err = _rel_err(bf16.images(0, 10), fp32.images(0, 10))
        assert 1e-4 < err < 0.02, err
        assert verify_store(stores["bf16"][i]) == []
        # fp16 autocast works on CPU too: 11 significant bits (2^-11 = 0.0005; 0.0004 measured)
        assert fp16.info.job["precision"] == "fp16"
        assert 1e-5 < _rel_err(fp16.images(0, 10), fp32.images(0, 10)) < 0.003


def test_resume_at_another_precision_is_refused(tmp_path, capsys, cifar10_dir):
    spec = {"format": "imagefolder", "root": str(cifar10_dir)}
    plan = plan_extract(SMALL, spec, [2], batch_size=2, max_images=6, shard_images=2)
    out = tmp_path / "out"
    _interrupted(plan, out, after_calls=1)  # auto: fp32 on CPU
    before = {p.name: p.read_bytes() for p in (out / "layer_2").iterdir()}
    with pytest.raises(VisaeError) as err:
        run_extract(plan, out, precision="bf16", progress=False, num_workers=0)
    assert str(err.value) == (f"{out / 'layer_2'} holds a store made with other settings (different precision): "
                              f"remove it or choose another output folder")
    assert {p.name: p.read_bytes() for p in (out / "layer_2").iterdir()} == before
    # the CLI's --precision reaches it too (the model is the same random init)
    small = json.dumps({"name": "vit_tiny_patch16_224", **SMALL})  # the name plan_extract gives it
    line = _one_line_error(capsys, ["extract", "--model", small, "--dataset", f"imagefolder:{cifar10_dir}",
                                    "--layers", "2", "--max-images", "6", "--batch-size", "2",
                                    "--shard-images", "2", "--workers", "0", "--no-progress",
                                    "--precision", "fp16", "--out", str(out)])
    assert line.endswith("made with other settings (different precision): remove it or choose another output folder")
    # a bf16 store resumes at bf16 only, and ends as an uninterrupted bf16 run
    ref = run_extract(plan, tmp_path / "ref", precision="bf16", progress=False, num_workers=0)[0]
    bf16 = tmp_path / "bf16"
    _interrupted(plan, bf16, after_calls=1, precision="bf16")
    with pytest.raises(VisaeError, match="other settings \\(different precision\\)"):
        run_extract(plan, bf16, precision="fp32", progress=False, num_workers=0)
    (path,) = run_extract(plan, bf16, precision="bf16", progress=False, num_workers=0)
    assert ActivationStore(path).info.job["precision"] == "bf16"
    for name in sorted(q.name for q in ref.glob("*.npy")):
        assert (ref / name).read_bytes() == (path / name).read_bytes(), name
    with pytest.raises(VisaeError, match="^unknown precision 'fp8': use one of auto, fp32, tf32, bf16, fp16$"):
        run_extract(plan, tmp_path / "bad", precision="fp8", progress=False)
    assert not (tmp_path / "bad").exists()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@CUDA
def test_cuda_fp32_matches_cpu_without_a_host_sync_per_batch(tmp_path, cifar10_dir):
    spec = {"format": "imagefolder", "root": str(cifar10_dir)}
    plan = plan_extract(SMALL, spec, [1, -1], dtype="fp32", batch_size=3, max_images=10, shard_images=4)
    cpu = run_extract(plan, tmp_path / "cpu", device="cpu", progress=False, num_workers=0)
    # From the first forward pass on, any synchronising CUDA call (a blocking copy, .item()) raises;
    # the one wait a shard, torch.cuda.synchronize, is not one of them.
    record, calls = plan.backbone.record, []

    def strict(px, layers):
        torch.cuda.set_sync_debug_mode("error")
        calls.append(1)
        return record(px, layers)

    plan.backbone.record = strict
    try:
        gpu = run_extract(plan, tmp_path / "gpu", device="cuda", precision="fp32", progress=False, num_workers=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        del plan.backbone.record
    assert len(calls) == 5  # batches of 3 and 1, 3 and 1, 2: none crosses a shard's end
    for c, g in zip(cpu, gpu):
        a, b = ActivationStore(g), ActivationStore(c)
        assert "precision" not in a.info.job and a.info.job == b.info.job
        assert np.array_equal(a.labels, b.labels)
        # cuDNN's convolutions run in TF32 by default (10-bit mantissa, relative 5e-4): the patch
        # embedding differs by about that, and the blocks carry it on
        assert _rel_err(a.images(0, 10), b.images(0, 10)) < 2e-3


@pytest.mark.cuda
@CUDA
def test_cuda_bf16_by_default(tmp_path, cifar10_dir):
    spec = {"format": "imagefolder", "root": str(cifar10_dir)}
    plan = plan_extract(SMALL, spec, [1, -1], batch_size=4, max_images=8, shard_images=4)  # fp16 stores
    cpu = run_extract(plan, tmp_path / "cpu", device="cpu", progress=False, num_workers=0)
    gpu = run_extract(plan, tmp_path / "gpu", device="cuda", progress=False)  # auto: bf16 on CUDA
    for c, g in zip(cpu, gpu):
        a, b = ActivationStore(g), ActivationStore(c)
        assert a.info.job == b.info.job | {"precision": "bf16"} and verify_store(g) == []
        # the bound of test_autocast_is_close_to_fp32_and_recorded, on CPU
        assert 1e-4 < _rel_err(a.images(0, 8), b.images(0, 8)) < 0.02


@pytest.mark.cuda
@CUDA
def test_cuda_fp16_range_is_checked_once_a_shard(tmp_path, cifar10_dir):
    bb = load_backbone(SMALL)
    with torch.no_grad():
        bb.model.blocks[2].mlp.fc2.weight.mul_(1e7)
    spec = _grey_then_real(tmp_path, cifar10_dir)
    plan = plan_extract(SMALL, spec, [1, 2], batch_size=2, max_images=4, shard_images=4, backbone=bb)
    with pytest.raises(VisaeError, match="^layer 2 of vit_tiny_patch16_224 has activations up to [0-9.e+]+, beyond"):
        run_extract(plan, tmp_path / "a", device="cuda", precision="fp32", progress=False)
    assert not (tmp_path / "a").exists()

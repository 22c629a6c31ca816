"""Mistakes a user can fix are one line with exit 1 (flags, damaged checkpoints, the machine's own
OS errors); the rest is a bug with its traceback."""

from __future__ import annotations

import errno
import json
import re

import pytest

from visae.cli import main
from visae.errors import VisaeError
from visae.models.registry import load_backbone


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visae: error: "), err
    return err[0]


@pytest.mark.parametrize("argv, flag, value", [
    (["bench", "extract"], "--images", "0"), (["bench", "extract"], "--batch-size", "-2"),
    (["bench", "extract"], "--workers", "-1"), (["bench", "extract"], "--image-size", "0"),
    (["bench", "extract"], "--device", "cuda:9"), (["bench", "loader"], "--batch-size", "0"),
    (["bench", "loader"], "--images", "-1"), (["bench", "loader"], "--d-model", "0"),
    (["bench", "train"], "--d", "0"), (["bench", "train"], "--expansion", "-1"), (["bench", "train"], "--batch", "0"),
    (["bench", "train"], "--k", "0"), (["bench", "train"], "--threads", "0"), (["bench", "train"], "--device", "tpu"),
    (["models", "show", "timm:vit_tiny_patch16_224"], "--image-size", "0"),
])
def test_bench_and_models_flags_are_range_checked(tmp_path, capsys, argv, flag, value):
    out = tmp_path / "out"
    extra = ["--out", str(out)] if argv[0] == "bench" else []
    msg = one_line_error(capsys, argv + extra + [flag, value])
    assert flag in msg and value in msg
    assert not out.exists()


def test_mps_is_refused_with_the_reason(tmp_path, capsys):
    msg = one_line_error(capsys, ["evaluate", "--store", "x", "--sae", "y", "--out", str(tmp_path / "e"),
                                  "--device", "mps"])
    assert "--device" in msg and "'mps' is not supported (metrics accumulate in float64" in msg and not (tmp_path / "e").exists()


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    msg = one_line_error(capsys, ["synth", "--out", str(blocker / "store"), "--d", "8", "--atoms", "16", "--k", "2",
                                  "--images", "4", "--tokens-per-image", "4"])
    assert str(blocker) in msg


@pytest.mark.parametrize("code, user", [(errno.ENOSPC, True), (errno.EROFS, True), (errno.EDQUOT, True),
                                        (errno.EBADF, False)])
def test_environment_os_errors_are_the_users_others_are_bugs(monkeypatch, capsys, code, user):
    def fail(root):
        raise OSError(code, "simulated", "/results/x")

    monkeypatch.setattr("visae.store.cli.verify_store", fail)
    assert main(["verify", "/results/x"]) == (1 if user else 2)
    err = capsys.readouterr().err
    assert ("Traceback" in err) is not user
    if user:
        assert err.startswith("visae: error: [Errno") and err.count("\n") == 1


@pytest.mark.parametrize("seed", ["7", -1, 1.5, True])
def test_bad_init_seed_is_a_user_error(seed):
    with pytest.raises(VisaeError, match="init_seed must be a non-negative integer"):
        load_backbone({"source": "timm", "arch": "vit_tiny_patch16_224", "init_seed": seed})


def test_model_kwargs_timm_cannot_build_are_a_user_error():
    with pytest.raises(VisaeError, match="timm vit_tiny_patch16_224 cannot be built with model_kwargs"):
        load_backbone({"source": "timm", "arch": "vit_tiny_patch16_224",
                       "model_kwargs": {"embed_dim": 30, "num_heads": 4}})


def test_fetch_sweeps_a_killed_fetchs_temporary_files(tmp_path, fashion_mnist_dir):
    from visae.data.fashion_mnist import fetch_fashion_mnist
    out = tmp_path / "fm"
    out.mkdir()
    stale = out / ".train-images-idx3-ubyte.gz.k3j_x9.tmp"
    stale.write_bytes(b"half a file")
    fetch_fashion_mnist(out, source=fashion_mnist_dir)
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
         "train-labels-idx1-ubyte.gz"])


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    from visae.tools.synth import synth_store
    root = tmp_path_factory.mktemp("ck")
    store = synth_store(root / "store", d=8, atoms=16, k=2, images=16, tokens_per_image=4)
    grid = '[{"name": "t", "architecture": "topk", "k": 2, "expansion": 2, "batch_size": 16, "lr_warmup": 1}]'
    assert main(["train", "--store", str(store), "--grid-json", grid, "--out", str(root / "saes"),
                 "--tokens", "64"]) == 0
    return root / "saes" / "t"


@pytest.mark.parametrize("damage, needle", [
    (lambda cfg: "[1, 2]", "a JSON list, not an object"),
    (lambda cfg: json.dumps({**cfg, "architecture": "relux"}), "architecture 'relux'"),
    (lambda cfg: json.dumps({k: v for k, v in cfg.items() if k != "architecture"}), "architecture None"),
    (lambda cfg: json.dumps({**cfg, "width": "16"}), "width '16' is not a positive integer"),
    (lambda cfg: json.dumps({**cfg, "width": cfg["width"] * 2}), "does not fit its config.json"),
])
def test_a_damaged_sae_config_is_one_line(tmp_path, sae_dir, capsys, damage, needle):
    import shutil
    from visae.sae import load
    bad = tmp_path / "bad"
    shutil.copytree(sae_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(damage(cfg))
    with pytest.raises(VisaeError, match=re.escape(needle)):
        load(bad)


def test_auxk_loss_is_finite_when_the_residual_does_not_vary():
    """One token (or a constant residual) has zero variance: the aux term is 0, not NaN."""
    import torch

    from visae.sae.modules import build_sae
    sae = build_sae("topk", 8, 32, seed=0, k=2, k_aux=4, dead_tokens=1)
    sae.tokens_since_fired.fill_(10)  # every latent dead
    pre = torch.randn(1, 32)
    loss = sae.aux_loss(pre, torch.ones(1, 8))
    assert torch.isfinite(loss) and float(loss.detach()) >= 0


@pytest.mark.parametrize("argv, needle", [
    (["latents", "--store", "s", "--sae", "x", "--out", "{out}", "--top", "0"], "--top"),
    (["bench", "compare", "--out", "{out}", "--latents", "0"], "--latents"),
    (["compare", "--a", "{missing}", "--b", "{missing}", "--out", "{out}"], "no finished latent index"),
    (["compare", "--a", "x", "--b", "y", "--out", "{out}", "--threshold", "1.5"], "--threshold"),
    (["profile", "--index", "{missing}", "--out", "{out}", "--hierarchy-json", "{bad"], "--hierarchy-json"),
    (["profile", "--index", "{missing}", "--out", "{out}", "--shifts", "sepia"], "--shifts"),
    (["similarity", "--a", "{missing}", "--b", "{missing}", "--out", "{out}", "--knn", "0"], "--knn"),
])
def test_comparison_commands_refuse_bad_input_in_one_line(tmp_path, capsys, argv, needle):
    out, missing = tmp_path / "out", tmp_path / "missing"
    msg = one_line_error(capsys, [a.format(out=out, missing=missing) if "{" in a and a != "{bad" else a
                                  for a in argv])
    assert needle in msg
    assert not out.exists()

"""`visae train`: grid validation, outputs, checkpoints, NaN guard and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from visae.cli import main
from visae.errors import VisaeError
from visae.sae import load
from visae.sae.train import train_grid
from visae.tools.synth import synth_store

REPO = Path(__file__).resolve().parents[1]
RUN = ("import sys, torch; torch.set_num_threads(1); from visae.cli import main; "
       "sys.exit(main(sys.argv[1:]))")


# Tiny matmuls: one thread avoids OpenMP hand-off costs on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return synth_store(tmp_path_factory.mktemp("s") / "store", d=16, atoms=48, k=3, images=64,
                       tokens_per_image=16, seed=0, shard_images=16)


def _log(sae_dir: Path) -> list[dict]:
    import csv
    with open(sae_dir / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _grid(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


BASE = {"expansion": 4, "lr": 3e-3, "lr_warmup": 5, "l1_warmup": 5, "batch_size": 64}
ALL = [
    {"name": "relu", "architecture": "relu", "l1": 3e-2, **BASE},
    {"name": "topk", "architecture": "topk", "k": 4, "dead_tokens": 512, **BASE, "seed": 1},
    {"name": "btk", "architecture": "batchtopk", "k": 4, **BASE, "seed": 2},
    {"name": "jump", "architecture": "jumprelu", "l0": 1e-2, **BASE, "seed": 3},
    {"name": "mat", "architecture": "matryoshka", "k": 4, "inner": "topk", **BASE, "seed": 4},
]


def test_train_grid_outputs(tmp_path, store, capsys):
    out = tmp_path / "out"
    assert main(["train", "--store", str(store), "--grid", str(_grid(tmp_path, ALL)), "--out", str(out),
                 "--tokens", "1280", "--checkpoint-every", "640"]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seeds"]["topk"] == 1 and prov["config"]["store_hash"]
    for e in ALL:
        d = out / e["name"]
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["complete"] and cfg["status"] == "done"
        assert cfg["tokens_seen"] == 1280 and cfg["steps"] == 20
        assert cfg["architecture"] == e["architecture"] and cfg["width"] == 64
        assert cfg["source"]["model"] == "synthetic" and len(cfg["source"]["store_hash"]) == 64
        assert cfg["normalisation"]["scale"] > 0 and "code" in cfg
        rows = (d / "log.csv").read_text().splitlines()
        assert rows[0].startswith("model,dataset,layer,sae,store_hash,architecture,step,tokens,loss,mse,l0,lr,l1_coeff")
        assert len(rows) == 21
        ident = cfg["identity"]
        assert rows[1].startswith(f"synthetic,{ident['dataset']},0,{e['name']},{cfg['source']['store_hash']},"
                                  f"{e['architecture']},1,")
        sae = load(d)
        x = torch.randn(5, 16)
        assert sae.encode(x).shape == (5, 64) and sae(x).shape == (5, 16)
    # the L0 of TopK-style SAEs is exact in every logged step
    for name in ("topk", "btk", "mat"):
        l0s = [float(r["l0"]) for r in _log(out / name)]
        assert all(v == 4 for v in l0s)
    # lr warm-up in the log: lr/5, 2lr/5, ..., lr
    lrs = [float(r["lr"]) for r in _log(out / "relu")[:6]]
    assert lrs == pytest.approx([3e-3 * min(1, s / 5) for s in range(1, 7)])


@pytest.mark.parametrize("entry,needle", [
    ({"name": "a", "architecture": "gated", "l1": 1e-3}, "grid entry 'a': key 'architecture' is 'gated'; allowed: relu, topk"),
    ({"name": "b", "architecture": "topk", "k": 1000, "expansion": 4}, "grid entry 'b': key 'k' = 1000 exceeds the SAE width 64"),
    ({"name": "c", "architecture": "relu", "l1": -0.1}, "grid entry 'c': key 'l1' (the sparsity coefficient λ) must be >= 0"),
    ({"name": "d", "architecture": "topk"}, "grid entry 'd': missing key 'k'"),
    ({"architecture": "topk", "k": 4}, "grid entry #1: missing key 'name'"),
    ({"name": "e", "architecture": "relu", "l1": 1e-3, "lr": "fast"}, "grid entry 'e': key 'lr' must be a number"),
    ({"name": "f", "architecture": "relu", "l1": 1e-3, "epochs": 3}, "grid entry 'f': unknown key 'epochs'"),
    ({"name": "g", "architecture": "relu", "l1": 1e-3, "init": "xavier"},
     "grid entry 'g': key 'init' is 'xavier'; allowed: tied-0.1, tied, kaiming"),
    ({"name": "h", "architecture": "relu", "l1": 1e-3, "b_dec_init": "median"},
     "grid entry 'h': key 'b_dec_init' is 'median'; allowed: mean, zero"),
])
def test_bad_grid_entries_one_line(tmp_path, store, capsys, entry, needle):
    code = main(["train", "--store", str(store), "--grid", str(_grid(tmp_path, [entry])), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1, err
    assert needle in err[0], err[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_nan_stops_one_sae_and_others_finish(tmp_path, store, capsys):
    grid = [dict(ALL[0], name="good"), dict(ALL[1], name="good-topk"),
            dict(ALL[0], name="bad", lr=1e30, lr_warmup=0)]
    out = tmp_path / "out"
    code = main(["train", "--store", str(store), "--grid", str(_grid(tmp_path, grid)), "--out", str(out),
                 "--tokens", "1280"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "SAE 'bad' stopped" in err[0] and "at step" in err[0] and "checkpoint" in err[0]
    for name in ("good", "good-topk"):
        assert json.loads((out / name / "config.json").read_text())["complete"]
    assert not (out / "bad" / "sae.safetensors").exists()
    cfg = json.loads((out / "bad" / "checkpoint" / "config.json").read_text())
    assert cfg["status"] == "failed" and not cfg["complete"]
    last_good = load(out / "bad" / "checkpoint")
    assert all(torch.isfinite(p).all() for p in last_good.state_dict().values())
    with pytest.raises(VisaeError, match="did not finish"):
        load(out / "bad")


def test_d_model_mismatch_refused(tmp_path, store, capsys):
    out = tmp_path / "out"
    assert main(["train", "--store", str(store), "--grid", str(_grid(tmp_path, ALL[1:2])), "--out", str(out),
                 "--tokens", "128"]) == 0
    other = synth_store(tmp_path / "other", d=8, atoms=16, k=2, images=16, tokens_per_image=4)
    capsys.readouterr()
    code = main(["evaluate", "--store", str(other), "--sae", str(out / "topk"), "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "d_model=16" in err[0] and "d_model=8" in err[0]


def test_rerun_with_other_grid_refused(tmp_path, store, capsys):
    out = tmp_path / "out"
    args = ["train", "--store", str(store), "--out", str(out), "--tokens", "128"]
    assert main(args + ["--grid", str(_grid(tmp_path, ALL[1:2]))]) == 0
    assert main(args + ["--grid", str(_grid(tmp_path, ALL[:1]))]) == 1
    assert "other settings" in capsys.readouterr().err


def _train_cmd(store, grid, out, tokens):
    return [sys.executable, "-c", RUN, "train", "--store", str(store), "--grid", str(grid), "--out", str(out),
            "--tokens", str(tokens), "--checkpoint-every", str(64 * 10)]


def test_resume_after_sigkill_is_exact(tmp_path, store):
    grid = _grid(tmp_path, [ALL[0], ALL[1], ALL[2]])
    tokens = 64 * 300
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(store, grid, ref, tokens), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(store, grid, out, tokens), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / ".train" / "state.safetensors"
    deadline = time.time() + 60
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.05)  # well inside the run: after the first checkpoint, mid-way to the next
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "relu" / "config.json").exists(), "the run finished before it could be killed"

    subprocess.run(_train_cmd(store, grid, out, tokens), check=True, env=env, capture_output=True)
    for name in ("relu", "topk", "btk"):
        for f in ("sae.safetensors", "log.csv"):
            assert (out / name / f).read_bytes() == (ref / name / f).read_bytes(), (name, f)
        a = json.loads((out / name / "config.json").read_text())
        b = json.loads((ref / name / "config.json").read_text())
        a["source"]["store"] = b["source"]["store"] = None
        assert a == b


def test_each_sae_gets_its_own_seed_unless_shared_explicitly(tmp_path, store):
    """Entries without `seed:` start from different weights, derived from their names (the same
    on every run); an explicit shared seed gives shared weights. config.json records it."""
    from visae.sae.train import Member, validate_grid
    entries = [{"name": n, "architecture": "relu", "l1": 1e-3, "expansion": 4, "batch_size": 64} for n in ("a", "b")]

    def initial(grid):
        return [Member(e, 16, "cpu", tmp_path).sae for e in validate_grid(grid, 16)]

    a, b = initial(entries)
    assert not torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_enc, b.W_enc)
    a2, = initial(entries[:1])
    assert torch.equal(a.W_dec, a2.W_dec) and torch.equal(a.W_enc, a2.W_enc)
    shared = initial([dict(e, seed=7) for e in entries])
    assert torch.equal(shared[0].W_dec, shared[1].W_dec)
    out = tmp_path / "out"
    assert main(["train", "--store", str(store), "--grid", str(_grid(tmp_path, entries + [dict(entries[0], name="c",
                 seed=7)])), "--out", str(out), "--tokens", "128"]) == 0
    cfgs = {n: json.loads((out / n / "config.json").read_text()) for n in "abc"}
    assert cfgs["a"]["seed"] != cfgs["b"]["seed"] and cfgs["a"]["seed_from"] == "name"
    assert cfgs["c"]["seed"] == 7 and cfgs["c"]["seed_from"] == "entry"
    assert json.loads((out / "provenance.json").read_text())["seeds"]["a"] == cfgs["a"]["seed"]


def test_normalisation_and_split_recorded(tmp_path, store):
    """μ and the scale come from tokens drawn uniformly from the training split (all of them on a
    store this small), b_dec starts at the mean (or zero), and config.json records the split."""
    from visae.sae.split import split_images
    from visae.store import ActivationStore
    out = tmp_path / "out"
    grid = [{"name": "mean", "architecture": "relu", "l1": 1e-3, "expansion": 4, "normalize": False,
             "lr_warmup": 0, "batch_size": 64},
            {"name": "zero", "architecture": "relu", "l1": 1e-3, "expansion": 4, "normalize": False,
             "b_dec_init": "zero", "lr_warmup": 0, "batch_size": 64},
            {"name": "norm", "architecture": "relu", "l1": 1e-3, "expansion": 4, "lr_warmup": 0, "batch_size": 64}]
    assert main(["train", "--store", str(store), "--grid", str(_grid(tmp_path, grid)), "--out", str(out),
                 "--tokens", "64", "--heldout", "0.25", "--split-seed", "3"]) == 0
    st = ActivationStore(store)
    train, held = split_images(st.n_images, 0.25, 3)
    x = torch.cat([st.images(i, i + 1) for i in train]).reshape(-1, 16).double()
    cfg = json.loads((out / "norm" / "config.json").read_text())
    assert cfg["split"]["seed"] == 3 and cfg["split"]["heldout_images"] == len(held) == 16
    assert cfg["normalisation_sample"]["tokens"] == x.shape[0]
    norm = load(out / "norm")
    assert torch.allclose(norm.mu.double(), x.mean(0), atol=1e-6)
    assert norm.scale.item() == pytest.approx(float((x - x.mean(0)).norm(dim=1).mean() / 4), rel=1e-5)
    # one step moved b_dec by ~lr from its start: the mean, or zero
    assert (load(out / "mean").b_dec.double() - x.mean(0)).abs().max() < 1e-2
    assert load(out / "zero").b_dec.abs().max() < 1e-2


def test_a_shared_out_folder_keeps_files_that_are_not_visaes(tmp_path, store):
    """A fresh start unmarks only visae's own outputs: other tools' config.json files in --out stay."""
    out = tmp_path / "runs"
    theirs = [out / "other-tool" / "config.json", out / "notes" / "checkpoint" / "config.json", out / "provenance.json"]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"not": "visae"}')
    args = ["train", "--store", str(store), "--out", str(out), "--tokens", "128"]
    assert main(args + ["--grid", str(_grid(tmp_path, ALL[1:2]))]) == 0
    assert all(p.read_text() == '{"not": "visae"}' for p in theirs[:2])
    assert json.loads((out / "topk" / "config.json").read_text())["complete"] is True
    # a restart with other settings removes the earlier run's markers, and still only those
    assert main(args + ["--grid", str(_grid(tmp_path, ALL[:1])), "--restart-stale"]) == 0
    assert not (out / "topk" / "config.json").exists()
    assert all(p.read_text() == '{"not": "visae"}' for p in theirs[:2])


# -- the device paths (CUDA), exercised on CPU ---------------------------------------------
# `SAE.sync_free = True` makes a CPU step take the paths a CUDA step takes: no host read, no
# data-dependent shape (the TopK sparse backward in torch ops, AuxK without reading the dead
# count, BatchTopK's threshold on the device).
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "bincount"}


class _HostReads:
    """Records every op that makes the host wait for the device's data (`.item()`, bool(),
    boolean-mask indexing, bincount's size)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in HOST_READS:
                    seen.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("sync_free", [True, None], ids=["device-path", "cpu-path"])
def test_a_device_step_never_reads_the_device(tmp_path, store, monkeypatch, precision, sync_free):
    """Every architecture's step, AuxK on (past dead_tokens), queues its work without a host
    read; the CPU path does read (which is why the device path exists: the check can fail)."""
    from visae.sae.config import validate_grid
    from visae.sae.modules import SAE
    from visae.sae.train import Member
    from visae.store import ActivationStore

    monkeypatch.setattr(SAE, "sync_free", sync_free)
    grid = validate_grid([{**e, "batch_size": 32, **({"dead_tokens": 32} if "k" in e else {})} for e in ALL], 16)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    reads = {}
    for entry in grid:
        member = Member(entry, 16, "cpu", tmp_path, precision)
        member.open_log(0, ActivationStore(store).identity(entry["name"]))
        with _HostReads() as seen:
            for _ in range(3):
                member.train_step(x)
        reads[entry["name"]] = seen.seen
        assert member.flush() is False and member.step == 3
    if sync_free:
        assert reads == {e["name"]: [] for e in grid}
    else:
        assert reads["topk"] and reads["btk"]  # dead-latent counts, the threshold's update count


def test_the_device_path_trains_like_the_cpu_path(tmp_path, store, monkeypatch):
    """150 steps of the five architectures (AuxK active after 512 tokens) on the device path
    give the CPU path's weights to within float rounding; its sparse tensors are valid CSR
    (sorted columns: cuSPARSE assumes it, the CPU kernels do not check)."""
    from visae.sae.modules import SAE

    grid = [dict(e, dead_tokens=512) if "k" in e else e for e in ALL]
    runs = {}
    for tag, flag in (("cpu", None), ("device", True)):
        monkeypatch.setattr(SAE, "sync_free", flag)
        with torch.sparse.check_sparse_tensor_invariants(enable=flag is True):
            train_grid(store, grid, tmp_path / tag, tokens=64 * 150, progress=False)
        runs[tag] = {e["name"]: load(tmp_path / tag / e["name"]).state_dict() for e in grid}
    for name, ref in runs["cpu"].items():
        for key, value in ref.items():
            other = runs["device"][name][key]
            if value.is_floating_point():
                assert float((value - other).norm()) <= 1e-4 * float(value.norm()) + 1e-6, (name, key)
            else:
                assert torch.equal(value, other), (name, key)


def test_a_nan_found_on_the_device_leaves_the_last_good_weights(tmp_path, store):
    """The failing step and the steps queued after it (until the metrics are read) are all
    skipped: the checkpoint holds exactly the weights after the last good step, and the log
    stops there."""
    bad = dict(ALL[2], name="bad", lr=1e30, lr_warmup=0)  # step 0 is fine; its weights make step 1 NaN
    with pytest.raises(VisaeError, match="SAE 'bad' stopped: .* at step 1 "):
        train_grid(store, [bad, ALL[0]], tmp_path / "grid", tokens=64 * 40, progress=False)
    train_grid(store, [bad], tmp_path / "one", tokens=64, progress=False)  # exactly one step
    got, want = load(tmp_path / "grid" / "bad" / "checkpoint"), load(tmp_path / "one" / "bad")
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    assert [row["step"] for row in _log(tmp_path / "grid" / "bad")] == ["1"]
    assert len(_log(tmp_path / "grid" / "relu")) == 40


def test_bf16_precision_is_applied_and_recorded(tmp_path, store, capsys):
    """--precision bf16 (autocast) trains to about fp32's loss with other weights; the choice is
    in config.json; a precision that does not exist is one clear line."""
    grid = _grid(tmp_path, ALL[:2])
    finals = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["train", "--store", str(store), "--grid", str(grid), "--out", str(out), "--tokens", str(64 * 60),
                     "--precision", precision]) == 0
        for name in ("relu", "topk"):
            assert json.loads((out / name / "config.json").read_text())["precision"] == precision
        finals[precision] = {n: float(_log(out / n)[-1]["mse"]) for n in ("relu", "topk")}
    for name, mse in finals["fp32"].items():
        assert finals["bf16"][name] == pytest.approx(mse, rel=0.2)
        assert not torch.equal(load(tmp_path / "fp32" / name).W_enc, load(tmp_path / "bf16" / name).W_enc)
    with pytest.raises(VisaeError, match="unknown precision 'fp16': use one of auto, fp32, tf32, bf16$"):
        train_grid(store, ALL[:1], tmp_path / "x", tokens=64, precision="fp16")

"""The CUDA path against the CPU (issue 15): a few fp32 training steps on CUDA give the CPU's
weights, bf16 autocast trains to about fp32's loss, the loader lands the CPU loader's batches on
the device, and the train and loader benches run there. Every test here is marked `cuda` and
skips with its reason where no CUDA device is present, so CI (CPU only) reports them skipped;
`benchmarks/gpu.sh` runs them on a GPU machine (`pytest -m cuda`)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from visae.sae import load
from visae.sae.train import train_grid
from visae.store import ActivationStore, TokenLoader
from visae.tools.synth import synth_store

DEVICE = "cuda"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")]

BASE = {"expansion": 4, "lr": 3e-3, "lr_warmup": 1, "l1_warmup": 1, "batch_size": 64}
GRID = [{"name": "relu", "architecture": "relu", "l1": 3e-2, **BASE},
        {"name": "topk", "architecture": "topk", "k": 4, "dead_tokens": 10**6, **BASE, "seed": 1}]
# fp32 CUDA vs CPU: the same steps in another summation order. Rounding alone moves a weight by
# ~1e-8 after 5 Adam steps of lr 3e-3; 1e-5 absolute (1/300 of one step's lr) leaves room for
# nothing else, e.g. a latent chosen on one device and not the other.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synth_store(tmp_path_factory.mktemp("s") / "store", d=16, atoms=48, k=3, images=64,
                       tokens_per_image=16, seed=0, shard_images=16)


@pytest.fixture
def no_tf32():
    """fp32 means fp32: no TF32 tensor-core matmuls or convolutions (restored after)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _train(store, out, device, precision, steps):
    # precision= is train_grid's parameter from issue 15 (fp32 | tf32 | bf16 | auto)
    assert train_grid(store, GRID, out, tokens=steps * 64, device=device, precision=precision,
                      progress=False) == {"relu": "done", "topk": "done"}
    weights, logs = {}, {}
    for name in (e["name"] for e in GRID):
        weights[name] = {k: v.detach().cpu() for k, v in load(out / name).state_dict().items()}
        with open(out / name / "log.csv", newline="") as fh:
            logs[name] = list(csv.DictReader(fh))
    return weights, logs


def test_fp32_steps_on_cuda_give_the_cpu_weights(tmp_path, store, no_tf32):
    cpu_w, cpu_log = _train(store, tmp_path / "cpu", "cpu", "fp32", 5)
    gpu_w, gpu_log = _train(store, tmp_path / "gpu", DEVICE, "fp32", 5)
    one_w, _ = _train(store, tmp_path / "one", "cpu", "fp32", 1)
    for name in ("relu", "topk"):
        assert len(cpu_log[name]) == len(gpu_log[name]) == 5
        for a, b in zip(cpu_log[name], gpu_log[name]):
            assert float(b["mse"]) == pytest.approx(float(a["mse"]), rel=1e-4)
        for key, w in cpu_w[name].items():
            torch.testing.assert_close(gpu_w[name][key], w, atol=ATOL, rtol=RTOL, msg=f"{name}.{key}")
        # not vacuous: four more steps move the weights by far more than the tolerance
        assert (cpu_w[name]["W_enc"] - one_w[name]["W_enc"]).abs().max() > 100 * ATOL


def test_bf16_on_cuda_trains_to_about_fp32s_loss(tmp_path, store):
    finals = {}
    for precision in ("fp32", "bf16"):
        weights, logs = _train(store, tmp_path / precision, DEVICE, precision, 40)
        for e in GRID:
            assert json.loads((tmp_path / precision / e["name"] / "config.json").read_text())["precision"] == precision
        finals[precision] = ({n: float(rows[-1]["mse"]) for n, rows in logs.items()}, weights)
    for name, mse in finals["fp32"][0].items():
        assert np.isfinite(finals["bf16"][0][name]) and finals["bf16"][0][name] == pytest.approx(mse, rel=0.2)
        assert not torch.equal(finals["fp32"][1][name]["W_enc"], finals["bf16"][1][name]["W_enc"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_loader_lands_the_cpu_batches_on_the_device(tmp_path, dtype):
    """Shipped in the store's dtype from pinned memory, converted on the device: the batches,
    and the normalisation sample, are the CPU loader's, on the device, in the dtype asked for."""
    from visae.store import StoreLayout, StoreMeta, StoreWriter
    from visae.store.format import to_storage
    x = torch.randn(40, 16, 8)
    w = StoreWriter(tmp_path / "s", StoreMeta(dtype=dtype, d_model=8, layout=StoreLayout.patches((4, 4))), {}, 16, 40)
    w.open()
    for i in range(w.n_shards):
        a, b = w.shard_range(i)
        w.write_shard(i, {"acts": to_storage(x[a:b], dtype), "labels": np.zeros(b - a, np.int64)})
    store = ActivationStore(tmp_path / "s")
    for out_dtype in (torch.float32, torch.bfloat16):
        for prefetch in (True, False):
            kw = dict(seed=3, buffer_tokens=100, epochs=2, dtype=out_dtype, prefetch=prefetch)
            on_cpu = list(TokenLoader(store, 48, **kw))
            loader = TokenLoader(store, 48, device=DEVICE, **kw)
            on_gpu = list(loader)
            assert loader.pin and len(on_gpu) == len(on_cpu) == 2 * (640 // 48)
            assert all(g.device.type == "cuda" and g.dtype == out_dtype for g in on_gpu)
            assert all(torch.equal(g.cpu(), c) for g, c in zip(on_gpu, on_cpu))
        sample = torch.cat(list(TokenLoader(store, 48, device=DEVICE, dtype=out_dtype).sample(300, seed=1)))
        assert torch.equal(sample.cpu(), torch.cat(list(TokenLoader(store, 48, dtype=out_dtype).sample(300, seed=1))))
    loader = TokenLoader(store, 48, device=DEVICE)
    host = loader._gather(np.arange(48), loader._host_batch(48))
    assert host.is_pinned() and host.dtype == (torch.int16 if dtype == "bfloat16" else torch.float16)


def test_train_and_loader_benches_run_on_the_device(tmp_path):
    from visae.tools.bench import bench_loader
    from visae.tools.bench_train import CUDA_GOALS, bench_train
    r = bench_train(d=64, expansion=4, batch=512, k=8, loader_batches=2, device=DEVICE)
    assert r["goals"] == CUDA_GOALS and set(r["ratios"]) == set(CUDA_GOALS)
    assert (r["params"]["precision"], r["params"]["matmul_dtype"]) == ("bf16", "bfloat16")
    assert all(v > 0 for v in r["ratios"].values()) and r["device"]["cuda"]
    assert r["ratios"]["loader_feed"] == pytest.approx(r["loader_feed_tokens_per_s"] / r["tokens_per_s"]["topk"])
    lo = bench_loader(batch_size=256, images=32, d_model=64, device=DEVICE, out_dir=tmp_path)
    assert lo["params"]["device"] == DEVICE and lo["ratios"]["loader_vs_sequential_read"] > 0


def test_a_training_step_on_cuda_never_waits_for_the_device(tmp_path, store):
    """Every architecture's step (bf16 and fp32, AuxK on) queues its work: CUDA's sync debug mode
    raises at any blocking copy or .item() inside it. The metrics are read once, by flush().
    (torch documents that the mode does not see inside torch.sparse kernels: the TopK step's
    CSR products are checked only as far as their Python-level calls are.)"""
    from visae.sae.config import validate_grid
    from visae.sae.train import Member

    entries = [{"name": "relu", "architecture": "relu", "l1": 0.1}, {"name": "jump", "architecture": "jumprelu", "l0": 0.1},
               *({"name": a, "architecture": a, "k": 4, "dead_tokens": 64} for a in ("topk", "batchtopk", "matryoshka"))]
    grid = validate_grid([{**e, "expansion": 4, "batch_size": 64} for e in entries], 16)
    x = torch.randn(64, 16, device=DEVICE)
    for entry in grid:
        for precision in ("fp32", "bf16"):
            member = Member(entry, 16, DEVICE, tmp_path, precision)
            member.open_log(0, ActivationStore(store).identity(entry["name"]))
            member.train_step(x)  # the first step allocates (cuBLAS workspaces, Adam state)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):  # past dead_tokens: AuxK is on
                    member.train_step(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert member.flush() is False and member.step == 4, (entry["name"], precision)

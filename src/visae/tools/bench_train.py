"""The `train` benchmark: SAE training throughput, each figure against its limit measured in
the same run (absolute times on shared machines are noise; ratios are not).

- relu_flops: achieved FLOP/s of a full ReLU-L1 training step (forward, hand-written backward,
  parallel-gradient removal, Adam, decoder renormalisation), counting the conventional
  12·d·h FLOP per token, over torch.matmul FLOP/s on the six matmul shapes of a dense step
  (same dtype, same threads, outputs written into preallocated tensors, as the step does). The
  implementation does 5 of those 6 matmuls (dL/dx is never formed), so a ratio near 1.2 is the
  ceiling; `relu_flops_actual` counts 10·d·h instead. The step and the matmul reference are
  timed in alternation (at least 5 rounds); the ratio is the median of the per-round ratios,
  so a change in the machine's load hits both (`relu_flops_best_of`: best time over best time).
- topk_speedup: tokens/s of a TopK(k) step (hand-written sparse backward, same Adam, same
  decoder projection and renormalisation) over the dense ReLU-L1 step at the same shapes; the
  two are timed in the same rounds as the matmul reference, and the ratio is the median of the
  per-round ratios (`topk_speedup_best_of`: best time over best time).
- loader: tokens/s of TopK training fed by a TokenLoader over an on-disk fp16 store, over the
  same training fed from an in-memory tensor (TopK: the fastest step, so the hardest test).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from visae.sae.modules import ReLUSAE, TopKSAE
from visae.sae.optim import make_adam

GOALS = {"relu_flops": 0.8, "topk_speedup": 2.0, "loader": 0.9}


def _step_fn(sae, opt, xn, lam):
    def step():
        opt.zero_grad(set_to_none=False)
        sae.compute_grads(xn, lam)
        sae.remove_parallel_grad()
        opt.step()
        sae.normalise_decoder()
    return step


def _matmul_fn(B, d, h, dtype):
    """The six matmuls of a dense step, contiguous operands, outputs preallocated."""
    g = torch.Generator().manual_seed(0)
    shapes = [(B, d, h), (B, h, d), (h, B, d), (B, d, h), (d, B, h), (B, h, d)]
    mats = [(torch.randn(m, k, generator=g, dtype=dtype), torch.randn(k, n, generator=g, dtype=dtype),
             torch.empty(m, n, dtype=dtype)) for m, k, n in shapes]

    def run():
        for a, b, out in mats:
            torch.matmul(a, b, out=out)
    return run


def median(xs: list) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def interleaved(fns: dict, reps: int) -> dict:
    """Times of each function over `reps` rounds, timed in turns (one warm-up each first)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def bench_train(d: int = 384, expansion: int = 16, batch: int = 4096, k: int = 32, reps: int = 3,
                threads: int | None = 2, dtype: str = "float32", loader_batches: int = 6,
                device: str = "cpu") -> dict:
    """Run the benchmark; returns the JSON object (bench, device, params, ratios, goals, raw figures)."""
    from visae.provenance import device_info

    if threads:
        torch.set_num_threads(int(threads))
    tdtype = getattr(torch, dtype)
    h = int(d * expansion)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=g, dtype=tdtype)
    flop_step = 12.0 * d * h * batch

    relu = ReLUSAE(d, h, seed=0, dtype=tdtype)
    topk = TopKSAE(d, h, k=k, seed=0, dtype=tdtype, dead_tokens=10**12)
    times = interleaved({"matmul": _matmul_fn(batch, d, h, tdtype),
                          "relu": _step_fn(relu, make_adam(relu.parameters(), lr=1e-4), x, 1e-3),
                          "topk": _step_fn(topk, make_adam(topk.parameters(), lr=1e-4), x, 0.0)}, max(reps, 5))
    t_mm, t_relu, t_topk = min(times["matmul"]), min(times["relu"]), min(times["topk"])
    matmul_flops = flop_step / t_mm
    # The ratios: medians over rounds of the ratio of the two times taken back to back, so load
    # that comes and goes on a shared machine cancels instead of favouring either.
    relu_ratio = median([m / r for m, r in zip(times["matmul"], times["relu"])])
    topk_speedup = median([r / t for r, t in zip(times["relu"], times["topk"])])
    del relu

    # Loader: the same TopK training, fed from an fp16 store on disk vs from memory.
    loader_ratio, t_store, t_mem = _loader_ratio(topk, d, batch, loader_batches)

    relu_tps, topk_tps = batch / t_relu, batch / t_topk
    figures = {
        "matmul_flops": matmul_flops, "matmul_s": t_mm, "relu_step_s": t_relu, "topk_step_s": t_topk,
        "relu_flops_achieved": flop_step / t_relu,
        "relu_flops_actual": relu_ratio * 10.0 / 12.0,
        "relu_flops_best_of": (flop_step / t_relu) / matmul_flops,
        "tokens_per_s": {"relu": relu_tps, "topk": topk_tps},
        "topk_speedup_best_of": topk_tps / relu_tps,
        "loader_tokens_per_s": {"store": batch * loader_batches / t_store, "memory": batch * loader_batches / t_mem},
        "round_s": times,  # per round, in turns: the median ratios come from these
    }
    ratios = {"relu_flops": relu_ratio, "topk_speedup": topk_speedup,
              "loader": loader_ratio}
    return {"bench": "train", "device": device_info(),
            "params": {"d": d, "expansion": expansion, "width": h, "batch": batch, "k": k, "reps": reps,
                       "threads": torch.get_num_threads(), "dtype": dtype, "loader_batches": loader_batches,
                       "flop_per_token": 12 * d * h},
            "ratios": ratios, "goals": dict(GOALS),
            "passed": {name: ratios[name] >= goal for name, goal in GOALS.items()}, **figures}


def _loader_ratio(sae, d, batch, n_batches):
    from visae.store import ActivationStore, StoreLayout, StoreMeta, StoreWriter, TokenLoader
    from visae.store.format import to_storage

    tokens_per_image = 64
    n_images = -(-batch * (n_batches + 1) // tokens_per_image)
    opt = make_adam(sae.parameters(), lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        meta = StoreMeta(model="bench", layer=0, dataset="random", dtype="float16", d_model=d,
                         layout=StoreLayout.patches((8, 8)))
        w = StoreWriter(Path(tmp) / "s", meta, {"bench": 1}, shard_images=max(1, n_images // 4), n_images=n_images)
        w.open()
        g = torch.Generator().manual_seed(1)
        for i in range(w.n_shards):
            a, b = w.shard_range(i)
            w.write_shard(i, {"acts": to_storage(torch.randn(b - a, tokens_per_image, d, generator=g), "float16"),
                              "labels": torch.zeros(b - a, dtype=torch.int64).numpy()})
        store = ActivationStore(Path(tmp) / "s")
        mem = [xb.clone() for _, xb in zip(range(n_batches), TokenLoader(store, batch, seed=0, epochs=None))]

        def train(batches):
            t = time.perf_counter()
            for _, xb in zip(range(n_batches), batches):
                _step_fn(sae, opt, xb, 0.0)()
            return time.perf_counter() - t

        train(iter(mem[:1]))  # warm-up
        t_mem = min(train(iter(mem)) for _ in range(2))
        t_store = min(train(iter(TokenLoader(store, batch, seed=s, epochs=None))) for s in (1, 2))
    return t_mem / t_store, t_store, t_mem


if __name__ == "__main__":  # manual run: python -m visae.tools.bench_train
    import json
    print(json.dumps(bench_train(), indent=1, default=str))

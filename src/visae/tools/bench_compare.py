"""The `compare` benchmark: matching two SAEs' latents (visae.analysis.matching) at the issue's
size, 24,576 latents each over 50,000 images, on synthetic image-level activations.

- time: `correlations` + `assign` (the sparse path at this size), each timed, against the time of
  the correlation's dense matrix products alone: `products_vs_pipeline` = products / pipeline,
  so 1 would mean the streaming, centring, top-k reduction and assignment cost nothing beyond
  the unavoidable products. The products are timed one by one inside the run (the same chunks,
  interleaved with the rest, so a shared machine's load hits both alike); a sample of the same
  shapes timed apart from the run, scaled by their count, is reported beside it;
- memory: the process's peak resident memory during `correlations`, above what it held before
  (the inputs), against `matching.working_memory_bytes`, the bound the code documents
  (`memory_bound_vs_peak` = bound / peak; below 1 the documented bound is wrong). The
  assignment's own peak (its candidate graph) and the whole pipeline's are reported beside it.

The synthetic activations (`synthetic_pair`) have the sparsity of real ones: each latent fires on
a log-uniform fraction of images, mostly within one of the images' classes, with log-normal
magnitudes; a share of B's latents is a noisy permutation of A's (the rest independent), so the
matching has something to find.
"""

from __future__ import annotations

import ctypes
import re
import resource
import time

import numpy as np
import scipy.sparse as sp
import torch

from visae.analysis.matching import BLOCK, CHUNK, TOP_K, assign, correlations, working_memory_bytes

GOALS = {"products_vs_pipeline": 0.8, "memory_bound_vs_peak": 1.0}


def _latents(rng, n: int, h: int, classes: np.ndarray, freq: tuple[float, float], in_class: float):
    """(images, latents, values) of h latents firing on a log-uniform fraction of n images, a
    share `in_class` of each latent's firings inside its own class."""
    n_classes = int(classes.max()) + 1
    by_class = np.argsort(classes, kind="stable")
    starts = np.searchsorted(classes[by_class], np.arange(n_classes + 1))
    frequency = np.exp(rng.uniform(np.log(freq[0]), np.log(freq[1]), h))
    counts = rng.binomial(n, frequency)
    latent = np.repeat(np.arange(h), counts)
    own = rng.integers(0, n_classes, h)[latent]
    image = rng.integers(0, n, len(latent))
    inside = rng.random(len(latent)) < in_class
    size = starts[own[inside] + 1] - starts[own[inside]]
    image[inside] = by_class[starts[own[inside]] + (rng.random(inside.sum()) * size).astype(np.int64)]
    scale = rng.lognormal(0.0, 0.5, h)
    return image, latent, (scale[latent] * rng.lognormal(0.0, 0.5, len(latent))).astype(np.float32)


def _csr(n: int, h: int, image, latent, values) -> sp.csr_matrix:
    """Repeated (image, latent) entries keep their largest value (an image-level max)."""
    order = np.lexsort((-values, latent, image))
    image, latent, values = image[order], latent[order], values[order]
    first = np.ones(len(image), dtype=bool)
    first[1:] = (image[1:] != image[:-1]) | (latent[1:] != latent[:-1])
    return sp.csr_matrix((values[first], (image[first], latent[first])), shape=(n, h))


def synthetic_pair(n_images: int, latents: int, *, shared: float = 0.5, freq: tuple[float, float] = (1e-3, 0.1),
                   classes: int = 100, in_class: float = 0.7, drop: float = 0.1, noise: float = 0.2,
                   seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """(A, B, planted): two sparse float32 [n_images, latents] activation matrices. A share
    `shared` of B's latents copies an A latent (planted[j] = its A latent, -1 for B's own ones):
    each firing kept with probability 1 - drop, as many new ones added at random, magnitudes
    multiplied by log-normal(0, noise) noise."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_images) % min(classes, n_images))  # no class empty
    image, latent, values = _latents(rng, n_images, latents, labels, freq, in_class)
    a = _csr(n_images, latents, image, latent, values)
    n_shared = int(round(shared * latents))
    planted = np.full(latents, -1, dtype=np.int64)
    copies = rng.permutation(latents)[:n_shared]          # B latents that copy an A latent
    planted[copies] = rng.permutation(latents)[:n_shared]  # ... and which one
    a_of_b = np.full(latents, -1, dtype=np.int64)
    a_of_b[planted[copies]] = copies                     # A latent -> its copy in B
    keep = (a_of_b[latent] >= 0) & (rng.random(len(latent)) >= drop)
    copy_image, copy_latent = image[keep], a_of_b[latent[keep]]
    copy_values = values[keep] * rng.lognormal(0.0, noise, keep.sum()).astype(np.float32)
    added = rng.binomial(1, drop, len(copy_latent)).astype(bool)
    own_image, own_latent, own_values = _latents(rng, n_images, latents, labels, freq, in_class)
    own = planted[own_latent] < 0
    b = _csr(n_images, latents,
             np.concatenate([copy_image, rng.integers(0, n_images, added.sum()), own_image[own]]),
             np.concatenate([copy_latent, copy_latent[added], own_latent[own]]),
             np.concatenate([copy_values, copy_values[added], own_values[own]]))
    return a, b, planted


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1))


def _reset_peak() -> bool:
    """Hand freed heap memory back to the kernel (glibc's malloc_trim: else a step reusing it
    would not show in RSS), then reset the kernel's peak-RSS counter (what ru_maxrss reports) to
    the current RSS, where Linux allows it (/proc/self/clear_refs, "5")."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _products_time(n: int, h_a: int, h_b: int, block: int, chunk: int, device: str, sample: int) -> dict:
    """Time of the correlation's products alone: every distinct (block rows, chunk rows) shape
    of the run is timed `sample` times on random dense float32 operands (median), times the number
    of products of that shape."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    shapes: dict[tuple[int, int], int] = {}
    for i0 in range(0, h_a, block):
        for r0 in range(0, n, chunk):
            shape = (min(block, h_a - i0), min(chunk, n - r0))
            shapes[shape] = shapes.get(shape, 0) + 1
    total, per_shape = 0.0, []
    for (rows, depth), count in shapes.items():
        xa = torch.randn(depth, rows, generator=g).to(dev)
        xb = torch.randn(depth, h_b, generator=g).to(dev)
        out = torch.empty(rows, h_b, device=dev)
        times = []
        for _ in range(sample + 1):  # the first is a warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            torch.matmul(xa.T, xb, out=out)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
        median = float(np.median(times[1:]))
        total += median * count
        per_shape.append({"block": rows, "chunk": depth, "count": count, "median_s": median})
        del xa, xb, out
    return {"total_s": total, "shapes": per_shape}


def bench_compare(images: int = 50_000, latents: int = 24_576, *, top_k: int = TOP_K, block: int = BLOCK,
                  chunk: int = CHUNK, threads: int | None = 2, sample: int = 3, seed: int = 0,
                  device: str = "cpu") -> dict:
    """Run the benchmark; returns the JSON object (bench, params, ratios, goals, raw figures)."""
    if threads:
        torch.set_num_threads(int(threads))
    t = time.perf_counter()
    a, b, planted = synthetic_pair(images, latents, seed=seed)
    generate_s = time.perf_counter() - t
    before = _products_time(images, latents, latents, block, chunk, device, sample)

    product_seconds: list[float] = []
    peak_reset = _reset_peak()
    rss_start = _rss_kib()
    t = time.perf_counter()
    corr = correlations(a, b, top_k=top_k, block=block, chunk=chunk, device=device, product_seconds=product_seconds)
    correlations_s = time.perf_counter() - t
    correlations_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_start
    peak_reset &= _reset_peak()
    rss_between = _rss_kib()
    t = time.perf_counter()
    match = assign(corr, dense_limit=0)
    assign_s = time.perf_counter() - t
    assign_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_between
    peak_kib = max(correlations_kib, rss_between - rss_start + assign_kib)

    after = _products_time(images, latents, latents, block, chunk, device, sample)
    products_s = sum(product_seconds)
    alone_s = (before["total_s"] + after["total_s"]) / 2
    pipeline_s = correlations_s + assign_s
    bound = working_memory_bytes(latents, latents, top_k=top_k, block=block, chunk=chunk)
    copies = planted >= 0
    return {
        "bench": "compare",
        "params": {"images": images, "latents": latents, "top_k": top_k, "block": block, "chunk": chunk,
                   "threads": torch.get_num_threads(), "sample": sample, "seed": seed, "device": device,
                   "density_a": a.nnz / (images * latents), "density_b": b.nnz / (images * latents),
                   "planted_pairs": int(copies.sum())},
        "generate_s": generate_s,
        "correlations_s": correlations_s, "assign_s": assign_s, "pipeline_s": pipeline_s,
        "products_s": products_s, "products_count": len(product_seconds),
        "products_alone_s": alone_s, "products_alone_s_runs": [before["total_s"], after["total_s"]],
        "products_alone_shapes": before["shapes"],
        "products_alone_vs_pipeline": alone_s / pipeline_s,
        "products_method": ("products_s: every matrix product of the run, each timed where it runs (so load on a "
                            "shared machine hits it and the pipeline alike); products_alone_s: each distinct "
                            f"product shape timed {sample} times on random dense float32 operands outside the "
                            "pipeline (median after a warm-up) times its count, before and after it, averaged"),
        "peak_memory_bytes": peak_kib * 1024,
        "correlations_peak_bytes": correlations_kib * 1024, "assign_peak_bytes": assign_kib * 1024,
        "memory_method": ("per step, ru_maxrss after it minus VmRSS before it, freed heap returned (malloc_trim) "
                          "and the peak reset to the current RSS (/proc/self/clear_refs) first; the pipeline's "
                          "peak is the larger of correlations' and assign's (plus what correlations left)"
                          if peak_reset else
                          "per step, ru_maxrss after it minus VmRSS before it; the peak could not be reset, so an "
                          "earlier peak may hide a step's"),
        "memory_bound_bytes": bound,
        "matched_pairs": int((match.partner >= 0).sum()),
        "matched_above_0.5": int((match.correlation > 0.5).sum()),
        "planted_recovered": float(np.mean(match.partner_of_b[copies] == planted[copies])),
        "ratios": {"products_vs_pipeline": products_s / pipeline_s,
                   "memory_bound_vs_peak": bound / max(correlations_kib * 1024, 1)},
        "goals": dict(GOALS),
    }

"""Matching SAE latents across two models by the correlation of their image-level activations.

Two SAEs (of two models, or of one model from two seeds) are compared on the same images: every
latent of A is correlated with every latent of B, latents are paired one-to-one so the summed
positive correlation is largest, and the fraction paired above a threshold is read against a
permutation null (B's images shuffled, so no pairing can be real). Latents whose best
correlation stays low are the ones unique to their model.

At 24,576 x 24,576 latents the correlation matrix (4.8 GB in float64) is never held: A's latents
are processed in blocks, each block's correlations with all of B are reduced to top-k candidates
before the next, and the one-to-one assignment runs on those candidates (a sparse matching);
where the dense matrix fits, scipy's Hungarian solver runs on it instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from visae.errors import VisaeError
from visae.progress import counted

BLOCK = 1024                # A latents per block
CHUNK = 2048                # images per dense chunk
TOP_K = 128                 # candidates kept per latent, each side
MOMENT_SLICE = 1 << 20      # sparse entries per float64 slice of the column moments
DENSE_LIMIT = 4096 * 4096   # largest h_a * h_b assigned with the dense Hungarian solver
UNIQUE_BELOW = 0.2          # best correlation under which a latent counts as unique to its model


@dataclass(frozen=True)
class Correlations:
    """Each latent's top-k correlations with the other side, descending (float64), and the
    dense float32 matrix when it was kept."""
    n_images: int
    row_values: np.ndarray   # [h_a, k]: each A latent's best correlations with B latents
    row_indices: np.ndarray  # [h_a, k]: the B latents
    col_values: np.ndarray   # [h_b, k]: each B latent's best correlations with A latents
    col_indices: np.ndarray  # [h_b, k]: the A latents
    dense: np.ndarray | None = None  # [h_a, h_b] float32, only with keep_dense

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_values), len(self.col_values)

    @property
    def row_max(self) -> np.ndarray:
        return self.row_values[:, 0]

    @property
    def col_max(self) -> np.ndarray:
        return self.col_values[:, 0]


@dataclass(frozen=True)
class Assignment:
    """A one-to-one pairing: each A latent's B partner (-1: unmatched) and their correlation
    (0 where unmatched); `method` is "dense" or "sparse"."""
    partner: np.ndarray      # int64 [h_a]
    correlation: np.ndarray  # float64 [h_a]
    h_b: int
    method: str

    @property
    def objective(self) -> float:
        return float(self.correlation.sum())

    @property
    def partner_of_b(self) -> np.ndarray:
        """Each B latent's A partner (-1: unmatched)."""
        out = np.full(self.h_b, -1, dtype=np.int64)
        matched = self.partner >= 0
        out[self.partner[matched]] = np.flatnonzero(matched)
        return out

    @property
    def correlation_of_b(self) -> np.ndarray:
        out = np.zeros(self.h_b)
        matched = self.partner >= 0
        out[self.partner[matched]] = self.correlation[matched]
        return out


def _as_csr(m) -> sp.csr_matrix:
    return sp.csr_matrix(m, dtype=np.float32)


def _check_pair(a, b) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    a, b = _as_csr(a), _as_csr(b)
    if a.shape[0] != b.shape[0]:
        raise VisaeError(f"activation matrices cover different images ({a.shape[0]} rows vs {b.shape[0]}): "
                         f"build both latent indices on the same images in the same order")
    if a.shape[0] < 2 or min(a.shape[1], b.shape[1]) < 1:
        raise VisaeError(f"cannot correlate latents over {a.shape[0]} images with {a.shape[1]} and {b.shape[1]} "
                         f"latents: need at least 2 images and 1 latent on each side")
    return a, b


def _column_moments(m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1 / sqrt(n * variance)) of every column in float64; 0 for a zero-variance column,
    so it correlates 0 with everything."""
    n, h = m.shape
    total, total_sq = np.zeros(h), np.zeros(h)
    for s0 in range(0, m.nnz, MOMENT_SLICE):  # slices of the entries: bounded float64 copies
        values = m.data[s0:s0 + MOMENT_SLICE].astype(np.float64)
        cols = m.indices[s0:s0 + MOMENT_SLICE]
        total += np.bincount(cols, weights=values, minlength=h)
        total_sq += np.bincount(cols, weights=values * values, minlength=h)
    mean, mean_sq = total / n, total_sq / n
    var = mean_sq - mean * mean
    live = var > 1e-12 * mean_sq
    inv = np.zeros(h)
    inv[live] = 1.0 / np.sqrt(n * var[live])
    return mean, inv


def working_memory_bytes(h_a: int, h_b: int, *, top_k: int = TOP_K, block: int = BLOCK, chunk: int = CHUNK,
                         keep_dense: bool = False) -> int:
    """Upper bound on what `correlations` allocates beyond its inputs and A's column block (a
    CSR slice of A): a block's float64 accumulator and float32 product (12 * block * h_b bytes),
    the dense chunk buffers of both sides (4 * chunk * (block + h_b)), the top-k state with the
    buffers and work of merging a block's top-k into B's (16 * h_a * k + 112 * h_b * k) and, with
    keep_dense, the dense result (4 * h_a * h_b)."""
    block = min(block, h_a)
    k_a, k_b = min(top_k, h_b), min(top_k, h_a)
    return (12 * block * h_b + 4 * chunk * (block + h_b) + 16 * h_a * k_a + 112 * h_b * k_b
            + (4 * h_a * h_b if keep_dense else 0))


def _product(xa: torch.Tensor, xb: torch.Tensor, out: torch.Tensor, seconds: list | None) -> None:
    """out = xaᵀ xb, timed into `seconds` when it is a list."""
    if seconds is None:
        torch.matmul(xa.T, xb, out=out)
        return
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    start = time.perf_counter()
    torch.matmul(xa.T, xb, out=out)
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    seconds.append(time.perf_counter() - start)


def _accumulate(acc: torch.Tensor, prod: torch.Tensor) -> None:
    """acc (float64) += prod (float32). On the CPU through numpy: its single-threaded mixed-dtype
    add is several times faster than torch's, and has no thread barrier for a busy machine to stall."""
    if acc.device.type == "cpu":
        np.add(acc.numpy(), prod.numpy(), out=acc.numpy())
    else:
        acc.add_(prod)


@torch.no_grad()
def correlations(a, b, *, top_k: int = TOP_K, block: int = BLOCK, chunk: int = CHUNK, keep_dense: bool = False,
                 device: str = "cpu", product_seconds: list | None = None) -> Correlations:
    """Pearson correlation of every column of `a` [n, h_a] with every column of `b` [n, h_b]
    (sparse, rows the same images in the same order), kept as each latent's top-k on both sides.

    Column means and variances are float64 sums over the sparse entries. The cross products are
    streamed: for each block of `block` A latents, `chunk` images at a time are made dense,
    centred (float32) and multiplied on `device` with torch; the products accumulate in float64.
    Memory beyond the inputs stays under `working_memory_bytes` (0.91 GB at the defaults with
    h_a = h_b = 24,576; the full float64 matrix there would be 4.8 GB). With a list as
    `product_seconds`, the time of each matrix product (synchronised) is appended to it."""
    a, b = _check_pair(a, b)
    if min(top_k, block, chunk) < 1:
        raise VisaeError(f"top_k, block and chunk must be positive, got {top_k}, {block}, {chunk}")
    (n, h_a), h_b = a.shape, b.shape[1]
    dev = torch.device(device)
    mean_a, inv_a = _column_moments(a)
    mean_b, inv_b = _column_moments(b)
    mean_b_t = torch.from_numpy(mean_b.astype(np.float32)).to(dev)
    inv_b_t = torch.from_numpy(inv_b).to(dev)
    k_a, k_b = min(top_k, h_b), min(top_k, h_a)
    block, chunk = min(block, h_a), min(chunk, n)
    # Everything is allocated once, here: per-block temporaries would fragment the heap, and
    # resident memory would creep up block after block.
    f64, i64 = {"dtype": torch.float64, "device": dev}, {"dtype": torch.int64, "device": dev}
    acc_buf = torch.empty(block * h_b, **f64)
    prod_buf = torch.empty(block * h_b, dtype=torch.float32, device=dev)
    dense_a_buf, dense_b_buf = np.empty(chunk * block, np.float32), np.empty(chunk * h_b, np.float32)
    row_values, row_indices = torch.empty((h_a, k_a), **f64), torch.empty((h_a, k_a), **i64)
    # B's running top-k over A in rows :k_b, the current block's below them
    cand_values = torch.full((2 * k_b, h_b), -torch.inf, **f64)
    cand_indices = torch.zeros((2 * k_b, h_b), **i64)
    merged_values, merged_rows = torch.empty((k_b, h_b), **f64), torch.empty((k_b, h_b), **i64)
    merged_indices = torch.empty((k_b, h_b), **i64)
    dense = np.empty((h_a, h_b), dtype=np.float32) if keep_dense else None
    for i0 in counted(range(0, h_a, block), total=h_a, desc="correlations", unit="latents",
                      size=lambda i0: min(block, h_a - i0)):
        i1 = min(i0 + block, h_a)
        width = i1 - i0
        a_block = a[:, i0:i1]
        mean_blk = torch.from_numpy(mean_a[i0:i1].astype(np.float32)).to(dev)
        acc = acc_buf[:width * h_b].view(width, h_b).zero_()
        prod = prod_buf[:width * h_b].view(width, h_b)
        for r0 in range(0, n, chunk):
            rows = min(r0 + chunk, n) - r0
            dense_a = a_block[r0:r0 + rows].toarray(out=dense_a_buf[:rows * width].reshape(rows, width))
            dense_b = b[r0:r0 + rows].toarray(out=dense_b_buf[:rows * h_b].reshape(rows, h_b))
            xa = torch.from_numpy(dense_a).to(dev).sub_(mean_blk)
            xb = torch.from_numpy(dense_b).to(dev).sub_(mean_b_t)
            _product(xa, xb, prod, product_seconds)
            _accumulate(acc, prod)
        inv_blk = torch.from_numpy(inv_a[i0:i1]).to(dev)
        acc.mul_(inv_blk[:, None]).mul_(inv_b_t[None, :]).clamp_(-1.0, 1.0)
        torch.topk(acc, k_a, dim=1, out=(row_values[i0:i1], row_indices[i0:i1]))
        k_blk = min(k_b, width)
        torch.topk(acc, k_blk, dim=0, out=(cand_values[k_b:k_b + k_blk], cand_indices[k_b:k_b + k_blk]))
        cand_values[k_b + k_blk:] = -torch.inf
        cand_indices[k_b:k_b + k_blk] += i0
        torch.topk(cand_values, k_b, dim=0, out=(merged_values, merged_rows))
        torch.gather(cand_indices, 0, merged_rows, out=merged_indices)
        cand_values[:k_b], cand_indices[:k_b] = merged_values, merged_indices
        if keep_dense:
            dense[i0:i1] = acc.cpu().numpy()
    return Correlations(n, row_values.cpu().numpy(), row_indices.cpu().numpy(),
                        cand_values[:k_b].T.cpu().numpy().copy(), cand_indices[:k_b].T.cpu().numpy().copy(), dense)


def _sparse_assignment(corr: Correlations) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A latents, their B partners, correlations) of a maximum-weight matching over the
    candidate edges (each latent's top-k, both sides, r > 0).

    The bipartite graph is made square and always perfectly matchable: A latent i may pair with
    a dummy "unmatched" column b'_i, B latent j with a dummy row a'_j, and a dummy row a'_j with a
    dummy column b'_i wherever (i, j) is a candidate (the dummies of a real pair pair with each
    other). With weights 2 - r on real edges, 1.5 on a latent's own dummy and 1 between dummies,
    every matching costs 1.5 * (h_a + h_b) - sum(r) over its real pairs: minimum cost is maximum
    summed correlation, and all weights are positive (csgraph drops explicit zeros)."""
    h_a, h_b = corr.shape
    k_a, k_b = corr.row_values.shape[1], corr.col_values.shape[1]
    i = np.concatenate([np.repeat(np.arange(h_a), k_a), corr.col_indices.ravel()])
    j = np.concatenate([corr.row_indices.ravel(), np.repeat(np.arange(h_b), k_b)])
    r = np.concatenate([corr.row_values.ravel(), corr.col_values.ravel()])
    positive = r > 0
    key, first = np.unique(i[positive] * h_b + j[positive], return_index=True)
    i, j, r = key // h_b, key % h_b, r[positive][first]
    rows = np.concatenate([i, np.arange(h_a), h_a + np.arange(h_b), h_a + j])
    cols = np.concatenate([j, h_b + np.arange(h_a), np.arange(h_b), h_b + i])
    weights = np.concatenate([2.0 - r, np.full(h_a + h_b, 1.5), np.ones(len(i))])
    graph = sp.csr_matrix((weights, (rows, cols)), shape=(h_a + h_b, h_a + h_b))
    rows, cols = min_weight_full_bipartite_matching(graph)
    real = (rows < h_a) & (cols < h_b)
    rows, cols = rows[real], cols[real]
    return rows, cols, r[np.searchsorted(key, rows * h_b + cols)]


def assign(corr: Correlations, *, dense_limit: int = DENSE_LIMIT, method: str = "auto") -> Assignment:
    """One-to-one pairing of A and B latents maximising the summed positive correlation (pairs
    at r <= 0 count as unmatched). "dense": scipy's linear_sum_assignment on the kept dense
    matrix; "sparse": a full bipartite matching over the top-k candidates; "auto": dense when the
    matrix was kept and h_a * h_b <= dense_limit."""
    h_a, h_b = corr.shape
    if method == "auto":
        method = "dense" if corr.dense is not None and h_a * h_b <= dense_limit else "sparse"
    if method not in ("dense", "sparse"):
        raise VisaeError(f"unknown assignment method {method!r}: use auto, dense or sparse")
    if method == "dense" and corr.dense is None:
        raise VisaeError("the dense assignment needs the dense matrix: compute correlations with keep_dense=True")
    if method == "dense":
        rows, cols = linear_sum_assignment(np.maximum(corr.dense, 0.0), maximize=True)
        values = corr.dense[rows, cols].astype(np.float64)
    else:
        rows, cols, values = _sparse_assignment(corr)
    positive = values > 0
    partner = np.full(h_a, -1, dtype=np.int64)
    correlation = np.zeros(h_a)
    partner[rows[positive]] = cols[positive]
    correlation[rows[positive]] = values[positive]
    return Assignment(partner, correlation, h_b, method)


def _alive(m: sp.csr_matrix, given, side: str) -> np.ndarray:
    if given is None:
        return np.bincount(m.indices, minlength=m.shape[1]) > 0
    given = np.asarray(given, dtype=bool)
    if given.shape != (m.shape[1],):
        raise VisaeError(f"alive_{side} has shape {given.shape}, expected ({m.shape[1]},): one flag per latent")
    return given


def _unique(best: np.ndarray, alive: np.ndarray, below: float) -> np.ndarray:
    """Alive latents whose best correlation is under `below`, lowest first (ties by index)."""
    idx = np.flatnonzero(alive & (best < below))
    return idx[np.argsort(best[idx], kind="stable")]


def match_latents(a, b, *, threshold: float = 0.5, alive_a=None, alive_b=None, null_seed: int = 0,
                  unique_below: float = UNIQUE_BELOW, top_k: int = TOP_K, dense_limit: int = DENSE_LIMIT,
                  block: int = BLOCK, chunk: int = CHUNK, device: str = "cpu") -> dict:
    """Match the latents of two SAEs on the same images (`a` [n, h_a], `b` [n, h_b] image-level
    activations) and summarise: the fraction of alive latents paired at a correlation above
    `threshold`, the same under a permutation null (B's image rows shuffled with `null_seed`,
    everything recomputed), and the latents unique to each side (best correlation under
    `unique_below`, most unique first). Alive latents (default: those that fire at least once)
    are the only ones correlated and counted.

    Returns {"summary": JSON-able numbers, and numpy arrays indexed by latent: partner_a/_b
    (-1 none), match_correlation_a/_b (0 when unmatched, NaN when dead), best_a/_b and
    best_partner_a/_b (best correlation with any latent of the other side, NaN / -1 when dead),
    null_match_correlation_a (the null's pairing), unique_a/_b (latent ids)}."""
    a, b = _check_pair(a, b)
    n, (h_a, h_b) = a.shape[0], (a.shape[1], b.shape[1])
    alive_a, alive_b = _alive(a, alive_a, "a"), _alive(b, alive_b, "b")
    ids_a, ids_b = np.flatnonzero(alive_a), np.flatnonzero(alive_b)
    if not len(ids_a) or not len(ids_b):
        raise VisaeError(f"no alive latents to match ({len(ids_a)} in A, {len(ids_b)} in B): "
                         f"check that both SAEs fire on these images")
    sub_a, sub_b = a[:, ids_a], b[:, ids_b]
    keep_dense = len(ids_a) * len(ids_b) <= dense_limit

    def run(b_rows):
        corr = correlations(sub_a, b_rows, top_k=top_k, block=block, chunk=chunk, keep_dense=keep_dense,
                            device=device)
        return corr, assign(corr, dense_limit=dense_limit)

    corr, match = run(sub_b)
    null_corr, null_match = run(sub_b[np.random.default_rng(null_seed).permutation(n)])

    def spread(values, ids, size, fill):
        out = np.full(size, fill, dtype=np.asarray(values).dtype)
        out[ids] = values
        return out

    partner_a = spread(np.where(match.partner >= 0, ids_b[match.partner], -1), ids_a, h_a, -1)
    partner_b = spread(np.where(match.partner_of_b >= 0, ids_a[match.partner_of_b], -1), ids_b, h_b, -1)
    best_a = spread(corr.row_max, ids_a, h_a, np.nan)
    best_b = spread(corr.col_max, ids_b, h_b, np.nan)
    matched = int((match.correlation > threshold).sum())
    null_matched = int((null_match.correlation > threshold).sum())
    unique_a, unique_b = _unique(best_a, alive_a, unique_below), _unique(best_b, alive_b, unique_below)
    summary = {
        "n_images": n, "latents_a": h_a, "latents_b": h_b, "alive_a": len(ids_a), "alive_b": len(ids_b),
        "threshold": threshold, "unique_below": unique_below, "top_k": top_k, "method": match.method,
        "null_seed": null_seed,
        "matched": matched, "matched_fraction_a": matched / len(ids_a), "matched_fraction_b": matched / len(ids_b),
        "null_matched": null_matched, "null_matched_fraction_a": null_matched / len(ids_a),
        "null_matched_fraction_b": null_matched / len(ids_b),
        "mean_match_correlation": float(match.correlation.sum() / len(ids_a)),
        "null_mean_match_correlation": float(null_match.correlation.sum() / len(ids_a)),
        "unique_a": len(unique_a), "unique_b": len(unique_b),
        "unique_fraction_a": len(unique_a) / len(ids_a), "unique_fraction_b": len(unique_b) / len(ids_b),
    }
    return {
        "summary": summary,
        "partner_a": partner_a, "partner_b": partner_b,
        "match_correlation_a": spread(match.correlation, ids_a, h_a, np.nan),
        "match_correlation_b": spread(match.correlation_of_b, ids_b, h_b, np.nan),
        "null_match_correlation_a": spread(null_match.correlation, ids_a, h_a, np.nan),
        "best_a": best_a, "best_b": best_b,
        "best_partner_a": spread(ids_b[corr.row_indices[:, 0]], ids_a, h_a, -1),
        "best_partner_b": spread(ids_a[corr.col_indices[:, 0]], ids_b, h_b, -1),
        "unique_a": unique_a, "unique_b": unique_b,
    }

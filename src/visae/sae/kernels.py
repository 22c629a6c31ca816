"""Fast CPU kernels of the SAE training steps: the reused workspaces (buffers shared by the SAEs
of one step shape), the two-level row top-k and the sparse decode. The modules call them;
numerics live here, so the SAE classes read as their recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from visae.sae.modules import SAE

_threshold_backward = torch.ops.aten.threshold_backward.grad_input
_WORKSPACES: dict = {}
_MAX_WORKSPACES = 2


def _workspace(B: int, d: int, h: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The buffers of one training step shape, filled in by each step kind as it needs them.
    On CPU they are kept and shared by every SAE of that shape (a grid steps its SAEs one after
    the other): a fresh [B, h] tensor costs a page-faulting pass of its own, as much as an
    elementwise op. Other devices have caching allocators, so they get fresh tensors."""
    key = (B, d, h, device, dtype)
    ws = _WORKSPACES.get(key)
    if ws is not None:
        return ws
    ws = {}
    if device.type == "cpu":
        while len(_WORKSPACES) >= _MAX_WORKSPACES:
            _WORKSPACES.pop(next(iter(_WORKSPACES)))
        _WORKSPACES[key] = ws
    return ws


def _common_buffers(ws: dict, B: int, d: int, h: int, device, dtype) -> None:
    """[B, h] scratch, the K = d + 1 augmented inputs (a column of ones after x − b_dec and after
    dL/dx̂), the augmented encoder weights [W_enc; b_enc] and a [h, d + 1] gradient buffer."""
    if "F" not in ws:
        ws.update(F=torch.empty(B, h, device=device, dtype=dtype), xa=torch.empty(B, d + 1, device=device, dtype=dtype),
                  ga=torch.empty(B, d + 1, device=device, dtype=dtype),
                  We=torch.empty(d + 1, h, device=device, dtype=dtype),
                  gWd=torch.empty(h, d + 1, device=device, dtype=dtype))
        ws["xa"][:, d] = 1
        ws["ga"][:, d] = 1


def _relu_workspace(B: int, d: int, h: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Buffers of one ReLU-L1 step: f and dL/df [B, h] (f's is reused for dL/dpre), x̂, the
    K = d + 1 augmented inputs and weights, the augmented decoder gradient."""
    ws = _workspace(B, d, h, device, dtype)
    _common_buffers(ws, B, d, h, device, dtype)
    if "G" not in ws:
        ws.update(G=torch.empty(B, h, device=device, dtype=dtype), xhat=torch.empty(B, d, device=device, dtype=dtype),
                  Wd=torch.empty(h, d + 1, device=device, dtype=dtype))
    return ws


def _topk_workspace(B: int, d: int, h: int, k: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Buffers of one TopK step: the pre-activations (ReLU's f buffer), the augmented inputs and
    encoder weights, the residual, the augmented encoder gradient, the kept values and indices."""
    ws = _workspace(B, d, h, device, dtype)
    _common_buffers(ws, B, d, h, device, dtype)
    if "gWe" not in ws:
        ws.update(gWe=torch.empty(h, d + 1, device=device, dtype=dtype), err=torch.empty(B, d, device=device, dtype=dtype))
    per_k = ws.get(("topk", k))
    if per_k is None:
        per_k = ws[("topk", k)] = {"vals": torch.empty(B, k, device=device, dtype=dtype),
                                   "idx": torch.empty(B, k, device=device, dtype=torch.int64),
                                   "crow_b": torch.arange(0, B * k + 1, k, device=device),
                                   "topk2": _row_topk_buffers(B, h, k, dtype)}
    return {**ws, **per_k}


_TOPK_CHUNKS = 8


def _row_topk(pre: torch.Tensor, k: int, vals: torch.Tensor, idx: torch.Tensor, bufs: tuple | None) -> None:
    """torch.topk(pre, k, dim=1, sorted=False) into (vals, idx) [B, k], for a CPU [B, h] pre,
    in two levels, with ~1/c of topk's per-element work: split each row into m = h / c
    strided chunks {j, j + m, ..., j + (c − 1)m}, take each chunk's max (an elementwise max of
    c contiguous slices, at memory speed), keep the k chunks with the largest maxima, and take
    the top k of their c·k entries. Exact: the k kept chunk maxima are k distinct entries ≥ t,
    the smallest of them, so every entry of the row's top k is ≥ t; an entry > t lies in a
    chunk whose max is > t, and fewer than k chunks have that, so all are kept; hence the
    candidates hold the row's top-k VALUES (the same multiset as torch.topk; which of several
    entries equal to the k-th value is taken is as arbitrary as topk's own choice).
    `bufs` from `_row_topk_buffers` (None: plain torch.topk)."""
    if bufs is None:
        torch.topk(pre, k, dim=1, sorted=False, out=(vals, idx))
        return
    B, h = pre.shape
    c = _TOPK_CHUNKS
    m = h // c
    cmax, cval, cidx, cand, pos = bufs
    p3 = pre.view(B, c, m)
    torch.amax(p3, 1, out=cmax)
    torch.topk(cmax, k, dim=1, sorted=False, out=(cval, cidx))
    torch.gather(p3, 2, cidx.unsqueeze(1).expand(B, c, k), out=cand)
    torch.topk(cand.view(B, c * k), k, dim=1, sorted=False, out=(vals, pos))
    # candidate (i, j) is entry i·m + cidx[b, j] of the row; small index work, in numpy
    p, ci, out = pos.numpy(), cidx.numpy(), idx.numpy()
    np.add(np.take_along_axis(ci, p % k, 1), (p // k) * m, out=out)


def _row_topk_buffers(B: int, h: int, k: int, dtype: torch.dtype) -> tuple | None:
    """Scratch of the two-level `_row_topk`; None where it would not pay (fewer than 4k chunks)."""
    c = _TOPK_CHUNKS
    m = h // c
    if h % c or m < 4 * k:
        return None
    return (torch.empty(B, m, dtype=dtype), torch.empty(B, k, dtype=dtype), torch.empty(B, k, dtype=torch.int64),
            torch.empty(B, c, k, dtype=dtype), torch.empty(B, k, dtype=torch.int64))


def _sparse_decode(sae: SAE, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x̂_n = Σ_j vals[:, j] · W_dec[idx[:, j]] + b_dec without forming the dense [B, h] code;
    embedding_bag's backward scatters into only the k rows per token."""
    return F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec

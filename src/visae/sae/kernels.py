"""Fast kernels of the SAE training steps: on CPU the reused workspaces (buffers shared by the
SAEs of one step shape), the two-level row top-k and the sparse decode; on other devices (CUDA)
the TopK step's sparse backward in torch ops that never wait for the device. The modules call
them; numerics live here, so the SAE classes read as their recipe."""

from __future__ import annotations

import warnings
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


def _fired(idx: torch.Tensor, vals: torch.Tensor, width: int) -> torch.Tensor:
    """[width] bool: latents with a positive kept value in the batch. A scatter of the [B, k]
    entries (no boolean indexing, whose output shape would need a host read)."""
    hits = torch.zeros(width, dtype=torch.int32, device=idx.device)
    return hits.scatter_reduce_(0, idx.reshape(-1), (vals > 0).reshape(-1).int(), "amax") > 0


def _sparse_decode(sae: SAE, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x̂_n = Σ_j vals[:, j] · W_dec[idx[:, j]] + b_dec without forming the dense [B, h] code;
    embedding_bag's backward scatters into only the k rows per token."""
    weights = vals.to(sae.W_dec.dtype)  # bf16 under autocast; embedding_bag wants the table's dtype
    return F.embedding_bag(idx, sae.W_dec, per_sample_weights=weights, mode="sum") + sae.b_dec


def _with_column(x: torch.Tensor, value: float) -> torch.Tensor:
    """[x, value, 0, ...]: x with a constant column (a bias riding in a product) and zero columns
    up to a multiple of 8, so a bf16 row is 16-byte aligned for cuBLAS's fast kernels (K = 769
    would not be)."""
    n, d = x.shape
    out = x.new_zeros(n, -(-(d + 1) // 8) * 8)
    out[:, :d] = x
    out[:, d] = value
    return out


def _encoder_with_bias(sae) -> torch.Tensor:
    """[W_enc; b_enc; 0, ...] [K, h]: the encoder with its bias as one more input row, K as
    `_with_column`'s width (the product of [xc, 1, 0...] with it is the biased encoder)."""
    d, h = sae.W_enc.shape
    out = sae.W_enc.new_zeros(-(-(d + 1) // 8) * 8, h)
    out[:d] = sae.W_enc
    out[d] = sae.b_enc
    return out


def relu_grads_on_device(sae, xn: torch.Tensor, sparsity_coeff: float):
    """A ReLU-L1 step with its gradients in `.grad`, as torch ops alone (no host read): the CPU
    step's five products (see ReLUSAE.compute_grads; autograd would form dL/dx as a sixth) in
    bf16 when autocast is on, fp32 otherwise; residual, losses and gradients kept in fp32."""
    B, d = xn.shape
    low = torch.bfloat16 if torch.is_autocast_enabled(xn.device.type) else xn.dtype
    with torch.no_grad(), torch.autocast(xn.device.type, enabled=False):
        xa_low = _with_column(xn - sae.b_dec, 1.0).to(low)  # [xc, 1, 0...]
        f = torch.mm(xa_low, _encoder_with_bias(sae).to(low)).relu_()  # [B, h]
        err = torch.mm(f, sae.W_dec.to(low)).float().add_(sae.b_dec).sub_(xn)  # x̂ − x
        mse = err.pow(2).mean()
        g_x = err * (2.0 / (B * d))  # dL/dx̂
        ga = _with_column(g_x, 1.0).to(low)  # [dL/dx̂, 1, 0...]
        g_dec = torch.mm(f.t(), ga).float()  # [dL/dW_dec, Σ_b f]
        l1 = g_dec[:, d].sum() / B
        wd = _with_column(sae.W_dec, sparsity_coeff / B).to(low)  # [W_dec, λ/B, 0...]
        g_pre = torch.mm(ga, wd.t()).mul_(f > 0)  # dL/df = dL/dx̂ W_decᵀ + λ/B, through the ReLU
        g_enc = torch.mm(xa_low.t(), g_pre).float()  # [dL/dW_enc; dL/db_enc]
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            if p.grad is None:
                p.grad = torch.empty_like(p)
        sae.W_enc.grad.copy_(g_enc[:d])
        sae.b_enc.grad.copy_(g_enc[d])
        sae.W_dec.grad.copy_(g_dec[:, :d])
        # b_dec: +Σ_b dL/dx̂ (decoder bias) − (Σ_b dL/dpre) W_encᵀ (subtracted before encoding)
        torch.sum(g_x, 0, out=sae.b_dec.grad)
        sae.b_dec.grad.sub_(sae.W_enc @ sae.b_enc.grad)
        l0 = (f > 0).sum() / B
    return mse + sparsity_coeff * l1, {"mse": mse, "l1": l1, "l0": l0, "fired": g_dec[:, d] > 0}


def topk_grads_on_device(sae, xn: torch.Tensor):
    """A TopK step (MSE + AuxK) with its gradients in `.grad`, as torch ops alone: no host read,
    no data-dependent shape, so a CUDA step is queued without waiting. Returns (loss, metrics).

    Only the encoder product [xc, 1] [W_enc; b_enc] and the top-k selection touch all h latents
    (under autocast that product runs in bf16, the rest in fp32). The decode is a gather
    (embedding_bag), and each sparse term (the k kept codes; the k_aux dead latents of AuxK)
    back-propagates through `_sparse_term_backward` in O(B·k·d). AuxK is computed once a latent
    can be dead and is multiplied by "any latent dead", so the step never asks the device."""
    B, d = xn.shape
    h, k = sae.width, sae.k
    xa = _with_column(xn - sae.b_dec, 1.0)  # [xc, 1, 0...]
    with torch.no_grad():
        pre = torch.mm(xa, _encoder_with_bias(sae))  # [B, h]; bf16 under autocast
    with torch.no_grad(), torch.autocast(xn.device.type, enabled=False):
        vals, idx = pre.topk(k, dim=1, sorted=False)
        vals = torch.relu(vals.float())
        err = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum").add_(sae.b_dec).sub_(xn)
        mse = err.pow(2).mean()  # err = x̂ − x
        g_x = err * (2.0 / (B * d))  # dL/dx̂
        grad_dec = torch.zeros_like(sae.W_dec)
        grad_enc = xn.new_zeros(h, xa.shape[1])  # [dL/dW_encᵀ, dL/db_enc, 0...]
        _sparse_term_backward(sae.W_dec, idx, vals, g_x, xa, grad_dec, grad_enc)
        aux = mse.new_zeros(())
        if sae.aux_alpha and sae.may_have_dead():
            dead = sae.dead_mask()
            a_vals, a_idx = pre.masked_fill(~dead, float("-inf")).topk(min(sae.k_aux, h), dim=1, sorted=False)
            a_vals = torch.relu(a_vals.float())
            e = -err  # the residual x − x̂, a constant of this loss
            r = F.embedding_bag(a_idx, sae.W_dec, per_sample_weights=a_vals, mode="sum").sub_(e)
            weight = sae.aux_alpha * dead.any() / (e - e.mean(0)).pow(2).mean().clamp_min(1e-12)
            aux = weight * r.pow(2).mean()
            _sparse_term_backward(sae.W_dec, a_idx, a_vals, r * (weight * 2.0 / (B * d)), xa, grad_dec, grad_enc)
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            if p.grad is None:
                p.grad = torch.empty_like(p)
        sae.W_enc.grad.copy_(grad_enc[:, :d].t())
        sae.b_enc.grad.copy_(grad_enc[:, d])
        sae.W_dec.grad.copy_(grad_dec)
        # b_dec: +Σ_b dL/dx̂ (decoder bias) − (Σ_b dL/dpre) W_encᵀ (subtracted before encoding)
        torch.sum(g_x, 0, out=sae.b_dec.grad)
        sae.b_dec.grad.sub_(sae.W_enc @ sae.b_enc.grad)
    return mse + aux, {"mse": mse, "aux": aux, "l0": (vals > 0).sum() / B, "fired": _fired(idx, vals, h),
                       "dead": sae.dead_mask().float().mean()}


def _sparse_term_backward(W_dec, idx, vals, g, xa, grad_dec, grad_enc) -> None:
    """Back-propagate a reconstruction Σ_j vals[b, j] · W_dec[idx[b, j]] (vals = ReLU of the
    pre-activations at idx) given its upstream gradient g [B, d]: adds Sᵀ g to grad_dec [h, d]
    and Gᵀ xa to grad_enc [h, K] (xa = [xc, 1, 0...]), S being the codes as CSR [B, h] (each row's
    columns sorted, as CSR requires; topk's are not) and G its gradient (g W_decᵀ sampled on S's
    pattern by sampled_addmm, masked by ReLU). Sᵀ and Gᵀ share one CSR [h, B] pattern: the
    entries sorted by latent (a stable argsort), each latent's row start found by searchsorted
    (no bincount, whose size would need a host read)."""
    B, k = idx.shape
    h = W_dec.shape[0]
    idx, by_column = idx.sort(1)
    flat, v = idx.reshape(-1), vals.gather(1, by_column).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        S = torch.sparse_csr_tensor(torch.arange(0, B * k + 1, k, device=idx.device), flat, v, size=(B, h))
        gv = torch.sparse.sampled_addmm(S, g, W_dec.t(), beta=0.0).values() * (v > 0)
        order = torch.argsort(flat, stable=True)
        crow = torch.searchsorted(flat[order], torch.arange(h + 1, device=idx.device))
        rows = torch.div(order, k, rounding_mode="floor")
        St = torch.sparse_csr_tensor(crow, rows, v[order], size=(h, B))
        Gt = torch.sparse_csr_tensor(crow, rows, gv[order], size=(h, B))
        grad_dec.add_(St @ g)
        grad_enc.add_(Gt @ xa)

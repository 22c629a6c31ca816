"""SAE modules: the paper's ReLU + L1 recipe and the modern variants (TopK, BatchTopK, JumpReLU,
Matryoshka).

Every SAE holds W_enc [d, h], b_enc [h], W_dec [h, d], b_dec [d] and two normalisation buffers,
`mu` [d] and `scale` (scalar). Training works on normalised activations x_n = (x - mu) / scale;
`encode`/`decode` take and return RAW activations, so a loaded checkpoint applies the
normalisation it was trained with.

MSE, everywhere in visae: the mean over batch AND model dimensions of (x̂_n - x_n)², in the
normalised space (so MSE ~ 1 means "no better than predicting the mean", since
E||x_n||² ≈ d by construction of `scale`). The sparsity penalty of ReLU-L1 is λ · mean over
the batch of Σ_latents |f| (decoder rows have unit norm, so no norm weighting is needed).

`train_loss(xn, sparsity_coeff)` returns (loss, metrics) and leaves gradients to autograd;
`compute_grads(xn, sparsity_coeff)` fills `.grad` and returns (loss, metrics) — the ReLU SAE
overrides it with a hand-written backward (fewer passes over [batch, h], one matmul fewer),
TopK-style SAEs decode sparsely with `embedding_bag` so their decoder work scales with k.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visae.sae.config import ARCH_KEYS, INITS
from visae.sae.kernels import (_fired, _relu_workspace, _row_topk, _sparse_decode, _threshold_backward,
                               _topk_workspace, relu_grads_on_device, topk_grads_on_device)

# The initialisations of (W_enc, W_dec) (INITS, in visae.sae.config); the first is the default. Decoder rows are unit-norm in all.
# - tied-0.1: W_dec random unit rows, W_enc = 0.1 · W_decᵀ (Conerly et al. 2024 start the encoder
#   as the decoder's transpose with small rows). Measured on a planted dictionary (see
#   docs/paper-parity.md) it recovers the atoms best, and its first step's loss is small.
# - tied: W_enc = W_decᵀ at full scale (visae before issue 9): each token starts by firing about
#   half the latents at full strength; the first-step MSE is ~30x the data's variance.
# - kaiming: what the paper ran (saev 2284f52): torch's kaiming_uniform_ on W_enc [d, h] and then
#   on W_dec [h, d], independently, from one generator (decoder rows then unit-normed).


def init_weights(d: int, h: int, seed: int, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_enc [d, h], W_dec [h, d]) in float32, a function of (seed, init)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
    g = torch.Generator().manual_seed(int(seed))
    if init == "kaiming":
        w_enc = nn.init.kaiming_uniform_(torch.empty(d, h), generator=g)
        w_dec = nn.init.kaiming_uniform_(torch.empty(h, d), generator=g)
        return w_enc, w_dec / w_dec.norm(dim=1, keepdim=True)
    w_dec = torch.randn(h, d, generator=g, dtype=torch.float32)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    return (0.1 if init == "tied-0.1" else 1.0) * w_dec.t().contiguous(), w_dec


class SAE(nn.Module):
    architecture = "base"

    def __init__(self, d_model: int, width: int, *, seed: int = 0, init: str = INITS[0], dtype=torch.float32,
                 **hparams):
        super().__init__()
        self.d_model, self.width = int(d_model), int(width)
        self.hparams = dict(hparams)
        w_enc, w_dec = init_weights(self.d_model, self.width, seed, init)
        self.W_dec = nn.Parameter(w_dec.to(dtype))
        self.W_enc = nn.Parameter(w_enc.to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.width, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_model, dtype=dtype))
        self.register_buffer("mu", torch.zeros(self.d_model, dtype=dtype))
        self.register_buffer("scale", torch.ones((), dtype=dtype))

    # -- normalisation ---------------------------------------------------------------------
    def set_normalisation(self, mu: torch.Tensor, scale: float | torch.Tensor) -> None:
        self.mu.copy_(torch.as_tensor(mu, dtype=self.mu.dtype))
        self.scale.fill_(float(scale))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mu.dtype) - self.mu) / self.scale

    def denormalise(self, xn: torch.Tensor) -> torch.Tensor:
        return xn * self.scale + self.mu

    @torch.no_grad()
    def init_b_dec(self, xn_sample: torch.Tensor) -> None:
        """The recipe: b_dec starts at the mean of the (normalised) training activations."""
        self.b_dec.copy_(xn_sample.to(torch.float64).mean(0).to(self.b_dec.dtype))

    # -- inference (normalised space) ------------------------------------------------------
    def pre_acts(self, xn: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, xn - self.b_dec, self.W_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_norm(self, xn: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(xn))

    def decode_norm(self, f: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec, f, self.W_dec)

    # -- inference (raw activations) -------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent codes of RAW activations [..., d] -> [..., h]."""
        shape = x.shape
        return self.encode_norm(self.normalise(x.reshape(-1, shape[-1]))).reshape(*shape[:-1], self.width)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """RAW reconstruction of latent codes [..., h] -> [..., d]."""
        shape = f.shape
        return self.denormalise(self.decode_norm(f.reshape(-1, shape[-1]))).reshape(*shape[:-1], self.d_model)

    def encode_some(self, x: torch.Tensor, latents) -> torch.Tensor:
        """The codes of `latents` only, of RAW activations [..., d] -> [..., len(latents)]: what an
        edit of a few latents reads. Exact; SAEs whose activation is elementwise override it to
        compute only those columns' pre-activations."""
        return self.encode(x)[..., self._latent_ids(latents)]

    def _latent_ids(self, latents) -> torch.Tensor:
        return torch.as_tensor(latents, dtype=torch.long, device=self.W_enc.device).reshape(-1)

    def _pre_acts_some(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Pre-activations of the latents `ids` only, [N, len(ids)], of RAW activations [..., d]."""
        xn = self.normalise(x.reshape(-1, x.shape[-1]))
        return torch.addmm(self.b_enc[ids], xn - self.b_dec, self.W_enc[:, ids])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- training --------------------------------------------------------------------------
    def train_loss(self, xn: torch.Tensor, sparsity_coeff: float):  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_grads(self, xn: torch.Tensor, sparsity_coeff: float):
        loss, metrics = self.train_loss(xn, sparsity_coeff)
        loss.backward()
        return loss.detach(), metrics

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the component of each decoder row's gradient along the row, so the
        step moves rows (to first order) along the unit sphere."""
        g, w = self.W_dec.grad, self.W_dec
        if g is None:
            return
        coef = torch.einsum("hd,hd->h", g, w).unsqueeze(1)
        g.addcmul_(w, coef, value=-1)

    @torch.no_grad()
    def normalise_decoder(self, applied: torch.Tensor | None = None) -> None:
        """Unit decoder rows. `applied` (a bool tensor, on the device): False when the optimiser
        skipped this step (a non-finite gradient, found on the device without a host sync), and
        then the rows are left exactly as they were."""
        norm = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if applied is not None:
            norm = torch.where(applied, norm, torch.ones_like(norm))
        self.W_dec.div_(norm)

    def after_step(self, metrics: dict, batch_size: int, applied: torch.Tensor | None = None) -> None:
        """Bookkeeping after an optimiser step (dead-latent counters, thresholds); none of it
        happens where `applied` is False (see `normalise_decoder`)."""

    def device_path(self, x: torch.Tensor) -> bool:
        """Whether a step takes the paths that never wait for the device (no `.item()`, no
        data-dependent shapes): on every device but the CPU, where a host read is free and the
        CPU kernels use it. `sync_free` (True/False) forces the choice: the tests run the
        device paths on CPU."""
        return self.sync_free if self.sync_free is not None else x.device.type != "cpu"

    sync_free: bool | None = None

    @staticmethod
    def mse(xhat: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        return (xhat - xn).pow(2).mean()


class ReLUSAE(SAE):
    """The paper's recipe: f = ReLU((x - b_dec) W_enc + b_enc), loss = MSE + λ · mean_b Σ_h |f|."""

    architecture = "relu"

    def activate(self, pre):
        return torch.relu(pre)

    def encode_some(self, x, latents):
        ids = self._latent_ids(latents)
        return torch.relu(self._pre_acts_some(x, ids)).reshape(*x.shape[:-1], len(ids))

    def train_loss(self, xn, sparsity_coeff):
        f = torch.relu(self.pre_acts(xn))
        xhat = self.decode_norm(f)
        mse = self.mse(xhat, xn)
        l1 = f.sum(1).mean()
        loss = mse + sparsity_coeff * l1
        return loss, {"mse": mse.detach(), "l1": l1.detach(), "l0": (f > 0).sum(1).float().mean(),
                      "fired": (f > 0).any(0)}

    def compute_grads(self, xn, sparsity_coeff):
        """Hand-written backward: 5 matmuls (autograd does 6: it also forms dL/dx) and three
        elementwise passes over [B, h] (ReLU, the L0 count, the ReLU mask), into reused buffers.

        Biases and constants ride in the matmuls as one extra inner row/column (K = d + 1):
        [xc, 1] @ [W_enc; b_enc] is the encoder with its bias; [g_x, 1] @ [W_dec, λ/B]ᵀ is dL/df
        with the L1 gradient already added; fᵀ [g_x, 1] gives dL/dW_dec and Σ_b f (L1 and
        `fired`); [xc, 1]ᵀ g_pre gives dL/dW_enc and dL/db_enc. dL/db_dec goes through the
        encoder as a vector-matrix product. On other devices (CUDA) the same five products in
        torch ops alone, in bf16 under autocast (`relu_grads_on_device`); on CPU under autocast,
        autograd."""
        if (not torch.is_grad_enabled() or xn.dtype != self.W_enc.dtype or xn.dim() != 2
                or xn.device != self.W_enc.device):
            return super().compute_grads(xn, sparsity_coeff)
        if self.device_path(xn):
            return relu_grads_on_device(self, xn, sparsity_coeff)
        if torch.is_autocast_enabled(xn.device.type):
            return super().compute_grads(xn, sparsity_coeff)
        with torch.no_grad():
            B, d = xn.shape
            ws = _relu_workspace(B, d, self.width, xn.device, xn.dtype)
            xa, ga, F, G = ws["xa"], ws["ga"], ws["F"], ws["G"]
            torch.sub(xn, self.b_dec, out=xa[:, :d])  # xc = x − b_dec, beside its column of ones
            ws["We"][:d].copy_(self.W_enc)
            ws["We"][d].copy_(self.b_enc)
            torch.mm(xa, ws["We"], out=F).relu_()  # f [B, h]
            err = torch.addmm(self.b_dec, F, self.W_dec, out=ws["xhat"]).sub_(xn)  # x̂ − x
            mse = torch.dot(err.view(-1), err.view(-1)) / (B * d)
            g_x = torch.mul(err, 2.0 / (B * d), out=ga[:, :d])  # dL/dx̂ [B, d]
            torch.mm(F.t(), ga, out=ws["gWd"])  # [dL/dW_dec, Σ_b f]
            f_sum = ws["gWd"][:, d]
            l1 = f_sum.sum() / B
            fired = f_sum > 0  # f ≥ 0: a column sums to > 0 iff some entry fired
            l0 = torch.gt(F, 0, out=G).sum() / B  # G is free until dL/df lands in it
            ws["Wd"][:, :d].copy_(self.W_dec)
            ws["Wd"][:, d].fill_(sparsity_coeff / B)
            torch.mm(ga, ws["Wd"].t(), out=G)  # dL/df = g_x W_decᵀ + λ/B
            _threshold_backward(G, F, 0.0, grad_input=F)  # dL/dpre, over f (no longer needed)
            # [dL/dW_enc; dL/db_enc], straight into this SAE's gradient storage (two views of it)
            g_enc = self._enc_grad_storage(d, xn.device, xn.dtype)
            torch.mm(xa.t(), F, out=g_enc)
            for p, g in ((self.W_enc, g_enc[:d]), (self.b_enc, g_enc[d])):
                if p.grad is None:
                    p.grad = g
                elif not (p.grad.data_ptr() == g.data_ptr() and p.grad.stride() == g.stride()):
                    p.grad.copy_(g)
            for p in (self.W_dec, self.b_dec):
                if p.grad is None:
                    p.grad = torch.empty_like(p)
            self.W_dec.grad.copy_(ws["gWd"][:, :d])
            # b_dec: +Σ_b dL/dx̂ (decoder bias) − (Σ_b dL/dpre) W_encᵀ (subtracted before encoding)
            torch.sum(g_x, 0, out=self.b_dec.grad)
            self.b_dec.grad.sub_(self.W_enc @ self.b_enc.grad)
            loss = mse + sparsity_coeff * l1
        return loss, {"mse": mse, "l1": l1, "l0": l0, "fired": fired}

    def _enc_grad_storage(self, d, device, dtype) -> torch.Tensor:
        """[d + 1, h]: rows :d hold dL/dW_enc and row d dL/db_enc (the grads are views of it)."""
        buf = self.__dict__.get("_enc_grad")
        if buf is None or buf.device != device or buf.dtype != dtype or buf.shape != (d + 1, self.width):
            buf = torch.empty(d + 1, self.width, device=device, dtype=dtype)
            self.__dict__["_enc_grad"] = buf
        return buf


class _AuxKMixin:
    """Dead-latent bookkeeping and the AuxK loss of Gao et al. 2024 (§A.2), as their reference
    code (openai/sparse_autoencoder, `normalized_mse`) computes it: the top `k_aux` pre-activations
    among dead latents reconstruct the residual e = x_n − x̂_n, and the loss is α · MSE(ê, e) /
    MSE(mean_batch(e), e), the squared error relative to the residual's variance; α = 1/32 and
    k_aux = d/2 by default (Gao et al.). A latent is dead when it has not fired for
    `dead_tokens` tokens."""

    def _init_aux(self, k_aux: int | None, aux_alpha: float, dead_tokens: int):
        self.k_aux = int(k_aux) if k_aux else max(1, min(self.width, self.d_model // 2))
        self.aux_alpha = float(aux_alpha)
        self.dead_tokens = int(dead_tokens)
        self.register_buffer("tokens_since_fired", torch.zeros(self.width, dtype=torch.int64))
        # Tokens stepped on so far, counted on the host by a trainer that sets it (visae train):
        # no latent can be dead before `dead_tokens` of them, so until then the AuxK loss costs
        # nothing and reads nothing from the device. None: not counted, any latent may be dead.
        self.tokens_trained: int | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.tokens_trained = None

    def may_have_dead(self) -> bool:
        return self.tokens_trained is None or self.tokens_trained >= self.dead_tokens

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def aux_loss(self, pre: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """α · MSE(decode_dead(top-k_aux of dead pre-activations), e) / Var(e) for the residual e;
        zero when none are dead. The residual is detached: this loss only moves the dead latents."""
        if self.aux_alpha == 0 or not self.may_have_dead():
            return pre.new_zeros(())
        dead = self.dead_mask()
        if self.device_path(pre):
            # No host read of the dead count: the top k_aux of the masked row (entries past the
            # dead ones are -inf, ReLU'd to 0, so they add nothing), and the loss is zeroed
            # where none are dead.
            k, any_dead = min(self.k_aux, self.width), dead.any()
        else:
            n_dead = int(dead.sum())
            if n_dead == 0:
                return pre.new_zeros(())
            k, any_dead = min(self.k_aux, n_dead), None
        masked = pre.masked_fill(~dead, float("-inf"))
        vals, idx = masked.topk(k, dim=1, sorted=False)
        vals = torch.relu(vals).to(self.W_dec.dtype)
        recon = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
        e = residual.detach().to(recon.dtype)
        # clamped: a batch whose residual does not vary (one token, a constant e) gives 0, not NaN
        loss = self.aux_alpha * (recon - e).pow(2).mean() / (e - e.mean(0)).pow(2).mean().clamp_min(1e-12)
        return loss if any_dead is None else loss * any_dead

    def after_step(self, metrics, batch_size, applied=None):
        fired = metrics.get("fired")
        if self.tokens_trained is not None:
            self.tokens_trained += batch_size
        if fired is None:
            return
        if applied is None:
            self.tokens_since_fired.add_(batch_size).masked_fill_(fired, 0)
        else:
            self.tokens_since_fired.add_(applied.long() * batch_size).masked_fill_(fired & applied, 0)


def _min_positive(vals: torch.Tensor) -> torch.Tensor:
    """The smallest positive entry, or +inf where none is positive: without a host read."""
    return torch.where(vals > 0, vals, torch.full_like(vals, float("inf"))).min()


class TopKSAE(_AuxKMixin, SAE):
    """f keeps the k largest pre-activations of each token (after ReLU); exact L0 = k."""

    architecture = "topk"

    def __init__(self, d_model, width, *, k: int, k_aux: int | None = None, aux_alpha: float = 1 / 32,
                 dead_tokens: int = 10_000_000, **kw):
        super().__init__(d_model, width, k=k, k_aux=k_aux, aux_alpha=aux_alpha, dead_tokens=dead_tokens, **kw)
        self.k = int(k)
        self._init_aux(k_aux, aux_alpha, dead_tokens)

    def select(self, pre: torch.Tensor):
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        return torch.relu(vals), idx

    def encode_some(self, x, latents):
        """A latent keeps its value where fewer than k latents of the token pre-activate above it:
        one encoder product and a count per latent, no top-k over the row (the same codes as
        `encode` except on exact ties, which continuous activations do not have)."""
        ids = self._latent_ids(latents)
        pre = self.pre_acts(self.normalise(x.reshape(-1, x.shape[-1])))
        mine = pre[:, ids]
        kept = [(pre > mine[:, j:j + 1]).sum(1, keepdim=True) < self.k for j in range(len(ids))]
        codes = torch.relu(mine) * torch.cat(kept, 1) if kept else mine
        return codes.reshape(*x.shape[:-1], len(ids))

    def activate(self, pre):
        vals, idx = self.select(pre)
        return torch.zeros_like(pre).scatter_(1, idx, vals)

    def compute_grads(self, xn, sparsity_coeff=0.0):
        """Hand-written sparse backward (CPU): only the encoder matmul and the top-k selection
        touch all h latents; decoding, dL/df and both weight gradients cost O(B·k·d).

        The encoder bias rides in the matmul as an extra inner row (K = d + 1, as in ReLU's
        step). With S the codes as CSR [B, h] (k entries per row, straight from topk):
        x̂ = embedding_bag(S) + b_dec; dL/df at the kept entries is (dL/dx̂) W_decᵀ sampled on S's
        pattern (sampled_addmm), masked by f > 0 (ReLU) into G; dL/dW_dec = Sᵀ dL/dx̂ and
        [dL/dW_encᵀ, dL/db_enc] = Gᵀ [xc, 1], with Sᵀ and Gᵀ CSR [h, B] on one pattern (entries
        grouped by latent: a stable radix argsort of the latent ids, in numpy). The [B, k]
        bookkeeping runs in numpy, single-threaded: on a busy machine every OpenMP region of a
        small op costs a scheduling quantum. Buffers are reused across steps (shared with ReLU
        SAEs of the same shape). Dead latents (AuxK), autocast: autograd. Other devices (CUDA):
        the same sparse backward in torch ops alone, AuxK included (`topk_grads_on_device`)."""
        if (type(self) is not TopKSAE or not torch.is_grad_enabled() or xn.dtype != self.W_enc.dtype
                or xn.dim() != 2 or xn.device != self.W_enc.device):
            return super().compute_grads(xn, sparsity_coeff)
        if self.device_path(xn):
            return topk_grads_on_device(self, xn)
        if torch.is_autocast_enabled("cpu") or bool(self.dead_mask().any()):
            return super().compute_grads(xn, sparsity_coeff)
        with torch.no_grad():
            B, d = xn.shape
            h, k = self.width, self.k
            ws = _topk_workspace(B, d, h, k, xn.device, xn.dtype)
            xa, pre, vals, idx, err = ws["xa"], ws["F"], ws["vals"], ws["idx"], ws["err"]
            xc = torch.sub(xn, self.b_dec, out=xa[:, :d])
            ws["We"][:d].copy_(self.W_enc)
            ws["We"][d].copy_(self.b_enc)
            torch.mm(xa, ws["We"], out=pre)  # pre-activations [B, h]
            _row_topk(pre, k, vals, idx, ws["topk2"])
            flat, v = idx.numpy().reshape(-1), vals.numpy().reshape(-1)
            np.maximum(v, 0, out=v)  # ReLU
            torch.sub(F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum"), xc, out=err)
            mse = torch.dot(err.view(-1), err.view(-1)) / (B * d)  # err = x̂ − x; dL/dx̂ = c·err
            c = 2.0 / (B * d)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                S = torch.sparse_csr_tensor(ws["crow_b"], idx.view(-1), vals.view(-1), size=(B, h))
                g_vals = torch.sparse.sampled_addmm(S, err, self.W_dec.t(), beta=0.0, alpha=c)
            gv = g_vals.values().numpy()
            kept = v > 0
            gv *= kept  # ReLU's gradient mask: dL/dpre = dL/df where f > 0
            fired = np.zeros(h, dtype=bool)
            fired[flat[kept]] = True
            # the transposed pattern: entries grouped by latent (stable radix argsort of the ids)
            perm = np.argsort(flat.astype(np.uint16 if h <= 2**16 else np.int64), kind="stable")
            crow_h = np.zeros(h + 1, dtype=np.int64)
            np.cumsum(np.bincount(flat, minlength=h), out=crow_h[1:])
            crow_h, rows = torch.from_numpy(crow_h), torch.from_numpy(perm // k)
            for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec):
                if p.grad is None:
                    p.grad = torch.empty_like(p)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                St = torch.sparse_csr_tensor(crow_h, rows, torch.from_numpy(v.take(perm)), size=(h, B))
                Gt = torch.sparse_csr_tensor(crow_h, rows, torch.from_numpy(gv.take(perm)), size=(h, B))
                # dL/dW_dec = Sᵀ dL/dx̂; [dL/dW_encᵀ, dL/db_enc] = Gᵀ [xc, 1]
                torch.addmm(self.W_dec.grad, St, err, beta=0.0, alpha=c, out=self.W_dec.grad)
                gWe = torch.addmm(ws["gWe"], Gt, xa, beta=0.0, out=ws["gWe"])
            self.W_enc.grad.copy_(gWe[:, :d].t())
            self.b_enc.grad.copy_(gWe[:, d])
            # b_dec: +Σ_b dL/dx̂ (decoder bias) − (Σ_b dL/dpre) W_encᵀ (subtracted before encoding)
            torch.sum(err, 0, out=self.b_dec.grad)
            torch.addmv(self.b_dec.grad, self.W_enc, self.b_enc.grad, beta=c, alpha=-1.0, out=self.b_dec.grad)
            l0 = mse.new_tensor(float(np.count_nonzero(kept)) / B)
            fired = torch.from_numpy(fired)
        return mse, {"mse": mse, "aux": mse.new_zeros(()), "l0": l0, "fired": fired,
                     "dead": self.dead_mask().float().mean()}

    def train_loss(self, xn, sparsity_coeff=0.0):
        pre = self.pre_acts(xn)
        vals, idx = self.select(pre)
        xhat = _sparse_decode(self, vals, idx)
        mse = self.mse(xhat, xn)
        aux = self.aux_loss(pre, xn - xhat)
        loss = mse + aux
        return loss, {"mse": mse.detach(), "aux": aux.detach(),
                      "l0": (vals > 0).sum(1).float().mean().detach(),
                      "fired": _fired(idx, vals.detach(), self.width),
                      "dead": self.dead_mask().float().mean()}


class BatchTopKSAE(TopKSAE):
    """Training keeps the k·B largest activations over the whole batch (Bussmann et al. 2024);
    inference uses a fixed threshold θ: a running average of the smallest activation kept in
    each training batch, with momentum min(t / (t + 50), `threshold_momentum`) at update t: θ
    starts at the first batch's value and averages over the last ~2% of the steps so far, so it
    follows the fast early changes (a fixed 0.99 from the start lags them: L0 7 against k = 32
    after 30 steps), then over ~100 steps from step ~5,000 on."""

    architecture = "batchtopk"

    def __init__(self, d_model, width, *, k: int, threshold_momentum: float = 0.99, **kw):
        super().__init__(d_model, width, k=k, **kw)
        self.hparams["threshold_momentum"] = threshold_momentum
        self.threshold_momentum = float(threshold_momentum)
        self.register_buffer("threshold", torch.full((), -1.0))  # < 0: not estimated yet
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def batch_select(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense codes keeping the k·B largest positive entries of the batch."""
        B = pre.shape[0]
        flat = torch.relu(pre).reshape(-1)
        vals, idx = flat.topk(min(self.k * B, flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter_(0, idx, vals).reshape(pre.shape), vals

    def activate(self, pre):
        if self.training or float(self.threshold) < 0:
            return self.batch_select(pre)[0]
        return pre * (pre > self.threshold)

    def encode_some(self, x, latents):
        """Elementwise (one fixed threshold) at inference once the threshold is set; otherwise the
        batch's top-k needs every latent. A Matryoshka over per-token top-k counts as TopK does."""
        if getattr(self, "inner", "batchtopk") == "topk":
            return TopKSAE.encode_some(self, x, latents)
        if self.training or float(self.threshold) < 0:
            return SAE.encode_some(self, x, latents)
        ids = self._latent_ids(latents)
        pre = self._pre_acts_some(x, ids)
        return (pre * (pre > self.threshold)).reshape(*x.shape[:-1], len(ids))

    def train_loss(self, xn, sparsity_coeff=0.0):
        pre = self.pre_acts(xn)
        f, vals = self.batch_select(pre)
        xhat = self.decode_norm(f)
        mse = self.mse(xhat, xn)
        aux = self.aux_loss(pre, xn - xhat)
        return mse + aux, {"mse": mse.detach(), "aux": aux.detach(),
                           "l0": (f > 0).sum(1).float().mean().detach(),
                           "fired": (f.detach() > 0).any(0), "dead": self.dead_mask().float().mean(),
                           "min_kept": _min_positive(vals.detach())}

    def after_step(self, metrics, batch_size, applied=None):
        super().after_step(metrics, batch_size, applied)
        m = metrics.get("min_kept")
        if m is None:
            return
        update = torch.isfinite(m)  # +inf: the batch kept no positive value
        if applied is not None:
            update &= applied
        if self.device_path(m):
            t = self.threshold_updates.to(torch.float64)
            beta = torch.clamp(t / (t + 50), max=self.threshold_momentum).float()
        else:
            t = int(self.threshold_updates)
            beta = min(self.threshold_momentum, t / (t + 50))
        m = m.float()  # bf16 under CPU autocast
        self.threshold.copy_(torch.where(update, self.threshold * beta + (1 - beta) * m, self.threshold))
        self.threshold_updates.add_(update.long())


class _JumpReLUFn(torch.autograd.Function):
    """f = pre · H(pre − θ). Gradient wrt pre: H(pre − θ); wrt θ: straight-through estimate
    −(θ/ε) · K((pre − θ)/ε) with the rectangle kernel K(u) = 1{|u| < 1/2}."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        window = ((pre - theta).abs() < eps / 2).to(g.dtype)
        g_pre = g * (pre > theta)
        g_theta = -(theta / eps) * (g * window).sum(0)
        return g_pre, g_theta, None


class _StepFn(torch.autograd.Function):
    """H(pre − θ) for the L0 penalty; gradient only wrt θ: −(1/ε) · K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, -(g * window).sum(0) / ctx.eps, None


class JumpReLUSAE(SAE):
    """JumpReLU (Rajamanoharan et al. 2024) with a learned per-latent threshold θ and an L0
    penalty λ · mean_b Σ_h H(pre − θ). θ is parameterised LINEARLY (not log θ): with Adam the
    step in a parameter is ~lr, so log θ moves θ by only ~lr·θ per step and stalls; a linear θ
    moves by ~lr in the normalised units the pre-activations live in. θ is clamped ≥ 0."""

    architecture = "jumprelu"

    def __init__(self, d_model, width, *, threshold_init: float = 0.1, bandwidth: float = 0.05, **kw):
        super().__init__(d_model, width, threshold_init=threshold_init, bandwidth=bandwidth, **kw)
        self.bandwidth = float(bandwidth)
        self.theta = nn.Parameter(torch.full((self.width,), float(threshold_init)))

    def activate(self, pre):
        return pre * (pre > self.theta)

    def encode_some(self, x, latents):
        ids = self._latent_ids(latents)
        pre = self._pre_acts_some(x, ids)
        return (pre * (pre > self.theta[ids])).reshape(*x.shape[:-1], len(ids))

    def train_loss(self, xn, sparsity_coeff):
        pre = self.pre_acts(xn)
        f = _JumpReLUFn.apply(pre, self.theta, self.bandwidth)
        xhat = self.decode_norm(f)
        mse = self.mse(xhat, xn)
        l0 = _StepFn.apply(pre, self.theta, self.bandwidth).sum(1).mean()
        loss = mse + sparsity_coeff * l0
        return loss, {"mse": mse.detach(), "l0": l0.detach(), "fired": (f.detach() > 0).any(0)}

    @torch.no_grad()
    def normalise_decoder(self, applied=None):
        super().normalise_decoder(applied)
        self.theta.clamp_(min=0.0)  # a skipped step left θ as it was, already >= 0


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the latents
    (`prefixes`: fractions of the width in (0, 1], default 1/8, 1/4, 1/2, 1; the full width is
    always one) each reconstruct x on their own; the loss is the SUM of the
    prefixes' MSEs (+ AuxK), as in Bussmann et al. 2025 (a mean would weaken the full SAE's
    reconstruction term by the number of prefixes). The sparse code comes from TopK or
    BatchTopK over all h latents."""

    architecture = "matryoshka"

    def __init__(self, d_model, width, *, k: int, inner: str = "batchtopk",
                 prefixes: list[float] | None = None, **kw):
        super().__init__(d_model, width, k=k, **kw)
        fractions = prefixes or [1 / 8, 1 / 4, 1 / 2, 1]
        if not all(0 < p <= 1 for p in fractions):
            raise ValueError(f"Matryoshka prefixes are fractions of the width in (0, 1], got {list(fractions)}")
        sizes = sorted({max(1, min(self.width, int(round(p * self.width)))) for p in fractions})
        if sizes[-1] != self.width:
            sizes.append(self.width)
        self.inner = inner
        self.prefix_sizes = sizes
        self.hparams.update(inner=inner, prefixes=list(fractions))

    def activate(self, pre):
        if self.inner == "topk":
            vals, idx = self.select(pre)
            return torch.zeros_like(pre).scatter_(1, idx, vals)
        return BatchTopKSAE.activate(self, pre)

    def prefix_reconstructions(self, f: torch.Tensor) -> list[torch.Tensor]:
        """x̂_n from each prefix f[:, :m] (cumulative, so the cost is one full decode)."""
        outs, acc, start = [], self.b_dec.expand(f.shape[0], -1), 0
        for m in self.prefix_sizes:
            acc = torch.addmm(acc, f[:, start:m], self.W_dec[start:m])
            outs.append(acc)
            start = m
        return outs

    def train_loss(self, xn, sparsity_coeff=0.0):
        pre = self.pre_acts(xn)
        min_kept = None
        if self.inner == "topk":
            vals, idx = self.select(pre)
            f = torch.zeros_like(pre).scatter(1, idx, vals)
        else:
            f, vals = self.batch_select(pre)
            min_kept = _min_positive(vals.detach())
        recons = self.prefix_reconstructions(f)
        mses = [self.mse(r, xn) for r in recons]
        mse_sum = torch.stack(mses).sum()
        aux = self.aux_loss(pre, xn - recons[-1])
        return mse_sum + aux, {"mse": mses[-1].detach(), "mse_prefix_sum": mse_sum.detach(),
                                "aux": aux.detach(), "l0": (f > 0).sum(1).float().mean().detach(),
                                "fired": (f.detach() > 0).any(0), "dead": self.dead_mask().float().mean(),
                                "min_kept": min_kept}


CLASSES = {"relu": ReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE,
           "matryoshka": MatryoshkaSAE}


def build_sae(architecture: str, d_model: int, width: int, seed: int = 0, init: str = INITS[0],
              **hparams) -> SAE:
    cls = CLASSES[architecture]
    kwargs = {k: v for k, v in hparams.items() if k in ARCH_KEYS[architecture] and v is not None}
    return cls(d_model, width, seed=seed, init=init, **kwargs)


def estimate_normalisation(sample) -> tuple[torch.Tensor, float]:
    """μ = mean, s = E||x − μ|| / √d over a sample of RAW activations (float64 accumulation).
    `sample` is a tensor, or a function returning the sample as an iterable of chunks (called
    twice: once for μ, once for s), so a large sample need not fit in memory."""
    chunks = (lambda: [sample]) if torch.is_tensor(sample) else sample
    n, total = 0, None
    for c in chunks():
        n += c.shape[0]
        c = c.to(torch.float64).sum(0)
        total = c if total is None else total + c
    mu = total / n
    s = sum(float((c.to(torch.float64) - mu).norm(dim=1).sum()) for c in chunks()) / n / math.sqrt(mu.numel())
    return mu.to(torch.float32), float(s) if s > 0 else 1.0

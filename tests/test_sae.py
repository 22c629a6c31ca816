"""SAE modules: each rule of the paper's recipe and of the variants, checked directly."""

from __future__ import annotations

import pytest
import torch

from visae.sae import (BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE, build_sae,
                       estimate_normalisation, load, lr_at, save, sparsity_at)
from visae.sae.config import INITS
from visae.tools.synth import make_atoms, synth_tokens


# Tiny matmuls: one thread avoids OpenMP hand-off costs on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=512, d=16, atoms=48, k=3, seed=0):
    return synth_tokens(make_atoms(d, atoms, seed), n, k, 0.01, torch.Generator().manual_seed(seed + 1))


def _step(sae, xn, lam=0.0, lr=1e-2, opt=None):
    opt = opt or torch.optim.Adam(sae.parameters(), lr=lr)
    opt.zero_grad()
    loss, m = sae.compute_grads(xn, lam)
    sae.remove_parallel_grad()
    opt.step()
    sae.normalise_decoder()
    sae.after_step(m, xn.shape[0])
    return loss, m, opt


def test_decoder_rows_stay_unit_norm_and_parallel_grad_removed():
    x = _data()
    sae = ReLUSAE(16, 64, seed=0)
    opt = None
    for _ in range(5):
        _, _, opt = _step(sae, x, lam=1e-3, opt=opt)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    opt.zero_grad()
    sae.compute_grads(x, 1e-3)
    assert sae.W_dec.grad.abs().sum() > 0
    sae.remove_parallel_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-6


def test_relu_manual_backward_matches_autograd():
    x = _data(n=64)
    a = ReLUSAE(16, 64, seed=3)
    b = ReLUSAE(16, 64, seed=3)
    with torch.no_grad():
        for s in (a, b):
            s.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
            s.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    la, _ = a.compute_grads(x, 3e-3)  # hand-written
    lb, _ = b.train_loss(x, 3e-3)
    lb.backward()
    assert torch.allclose(la, lb.detach(), rtol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-7)


def test_b_dec_initialised_to_data_mean():
    x = _data() + 3.0
    sae = ReLUSAE(16, 32)
    sae.init_b_dec(x)  # no normalisation: b_dec is the raw mean
    assert torch.allclose(sae.b_dec, x.mean(0), atol=1e-5)
    mu, s = estimate_normalisation(x)
    sae.set_normalisation(mu, s)
    sae.init_b_dec(sae.normalise(x))  # with it: the mean of the normalised data (~0)
    assert torch.allclose(sae.b_dec, sae.normalise(x).mean(0), atol=1e-6)
    assert sae.b_dec.abs().max() < 1e-5


def test_normalisation_constants():
    x = _data() * 7 + 2
    mu, s = estimate_normalisation(x)
    xn = (x - mu) / s
    assert torch.allclose(xn.mean(0), torch.zeros(16), atol=1e-5)
    assert abs(xn.norm(dim=1).mean().item() - 16 ** 0.5) < 1e-3


def test_warmup_schedules():
    assert lr_at(0, 1e-3, 500) == pytest.approx(1e-3 / 500)
    assert lr_at(249, 1e-3, 500) == pytest.approx(0.5e-3)
    assert lr_at(499, 1e-3, 500) == pytest.approx(1e-3)
    assert lr_at(10_000, 1e-3, 500) == pytest.approx(1e-3)
    assert [sparsity_at(s, 8e-4, 4) for s in range(6)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 8e-4, 8e-4])
    assert sparsity_at(0, 8e-4, 0) == 8e-4


@pytest.mark.parametrize("arch,kw", [("relu", {}), ("topk", {"k": 4}), ("batchtopk", {"k": 4}),
                                     ("jumprelu", {}), ("matryoshka", {"k": 4})])
def test_normalisation_round_trips_through_save_and_load(tmp_path, arch, kw):
    x = _data() * 5 + 1
    sae = build_sae(arch, 16, 64, seed=2, **kw)
    mu, s = estimate_normalisation(x)
    sae.set_normalisation(mu, s)
    sae.init_b_dec(sae.normalise(x))
    _step(sae, sae.normalise(x))
    sae.eval()
    save(sae, tmp_path / "sae", {"name": arch})
    back = load(tmp_path / "sae")
    assert type(back) is type(sae)
    assert torch.equal(back.mu, sae.mu) and float(back.scale) == float(sae.scale)
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))
        assert torch.equal(back(x), sae(x))
        # encode/decode take raw activations and apply the stored constants themselves
        manual = back.decode_norm(back.encode_norm((x - mu) / s)) * s + mu
        assert torch.allclose(back(x), manual, rtol=1e-5, atol=1e-4)


def test_topk_exact_l0():
    x = _data()
    sae = TopKSAE(16, 64, k=5)
    _, m = sae.train_loss(x)
    assert m["l0"] == 5
    f = sae.eval().encode_norm(x)
    assert ((f != 0).sum(1) == 5).all()


def test_batchtopk_exact_l0_and_threshold():
    x = _data(n=256)
    sae = BatchTopKSAE(16, 64, k=5)
    sae.train()
    f, _ = sae.batch_select(sae.pre_acts(x))
    assert int((f != 0).sum()) == 5 * 256
    assert float(sae.threshold) < 0  # not estimated before training
    opt = None
    for _ in range(20):
        _, m, opt = _step(sae, x, opt=opt)
    assert float(sae.threshold) > 0
    sae.eval()
    f = sae.encode_norm(x)
    assert (f[f != 0] > sae.threshold).all()
    assert 0 < (f != 0).sum(1).float().mean() <= 15  # a fixed threshold, no per-batch top-k


@pytest.mark.parametrize("sync_free", [None, True], ids=["cpu-path", "device-path"])
def test_auxk_only_touches_dead_latents(sync_free):
    x = _data(n=256)
    sae = TopKSAE(16, 64, k=4, k_aux=8, dead_tokens=100)
    sae.sync_free = sync_free
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    sae.tokens_since_fired[dead] = 1000
    pre = sae.pre_acts(x)
    residual = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    aux = sae.aux_loss(pre, residual)
    assert aux > 0
    aux.backward()
    alive = ~dead
    assert sae.W_dec.grad[alive].abs().max() == 0
    assert sae.W_enc.grad[:, alive].abs().max() == 0
    assert sae.b_enc.grad[alive].abs().max() == 0
    assert sae.W_dec.grad[dead].abs().sum() > 0
    # no dead latents: no aux loss at all
    sae.tokens_since_fired.zero_()
    assert sae.aux_loss(sae.pre_acts(x), residual) == 0


def test_dead_counter_updates():
    x = _data(n=128)
    sae = TopKSAE(16, 64, k=2, dead_tokens=256)
    _, m, _ = _step(sae, x)
    fired = m["fired"]
    assert (sae.tokens_since_fired[fired] == 0).all()
    assert (sae.tokens_since_fired[~fired] == 128).all()


def test_jumprelu_threshold_moves():
    x = _data(n=512)
    mu, s = estimate_normalisation(x)
    sae = JumpReLUSAE(16, 64, threshold_init=0.1, bandwidth=0.1)
    sae.set_normalisation(mu, s)
    xn = sae.normalise(x)
    sae.init_b_dec(xn)
    theta0 = sae.theta.detach().clone()
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(60):
        _step(sae, xn, lam=0.05, opt=opt)
    moved = (sae.theta.detach() - theta0).abs()
    assert moved.mean() > 0.02, moved.mean()
    assert (sae.theta >= 0).all()
    # and the L0 penalty pushes thresholds up on average
    assert sae.theta.mean() > theta0.mean()


def test_matryoshka_prefixes_each_reconstruct():
    x = _data(n=1024, atoms=32)
    mu, s = estimate_normalisation(x)
    sae = MatryoshkaSAE(16, 64, k=4, inner="topk")
    assert sae.prefix_sizes == [8, 16, 32, 64]
    sae.set_normalisation(mu, s)
    xn = sae.normalise(x)
    sae.init_b_dec(xn)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(150):
        _step(sae, xn, opt=opt)
    with torch.no_grad():
        f = sae.encode_norm(xn)
        recons = sae.prefix_reconstructions(f)
        var = (xn - xn.mean(0)).pow(2).sum()
        nmse = [float((r - xn).pow(2).sum() / var) for r in recons]
    assert len(nmse) == 4
    assert all(v < 0.9 for v in nmse), nmse  # even the h/8 prefix explains variance alone
    assert nmse[-1] <= nmse[0]
    assert torch.allclose(recons[-1], sae.decode_norm(f), atol=1e-5)


def test_topk_manual_backward_matches_autograd():
    x = _data(n=64)
    a, b = TopKSAE(16, 64, k=5, seed=4), TopKSAE(16, 64, k=5, seed=4)
    with torch.no_grad():
        for s in (a, b):
            s.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
            s.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    la, ma = a.compute_grads(x)  # hand-written sparse backward (no dead latents)
    lb, mb = b.train_loss(x)
    lb.backward()
    assert torch.allclose(la, lb.detach(), rtol=1e-5)
    assert torch.equal(ma["fired"], mb["fired"])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-7)


def _autograd_grads(sae, x, lam):
    for p in sae.parameters():
        p.grad = None
    loss, m = sae.train_loss(x, lam)
    loss.backward()
    return loss.detach(), m, [p.grad.clone() for p in sae.parameters()]


def _step_matches_autograd(s, r, opt, ref_opt, x, lam, check_l1=False):
    """One hand-written step of `s` against autograd on its twin `r`: equal loss, metrics and
    gradients; then the same update on both, so later steps compare at the same weights."""
    opt.zero_grad(set_to_none=False)
    la, ma = s.compute_grads(x, lam)
    lb, mb, grads = _autograd_grads(r, x, lam)
    assert torch.allclose(la, lb, rtol=1e-5)
    assert torch.allclose(ma["mse"], mb["mse"], rtol=1e-5)
    if check_l1:
        assert torch.allclose(ma["l1"], mb["l1"], rtol=1e-5)
    assert float(ma["l0"]) == float(mb["l0"])
    assert torch.equal(ma["fired"], mb["fired"])
    for p, g in zip(s.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)
    for p, q in zip(s.parameters(), r.parameters()):
        q.grad = p.grad.clone()
    for sae, o in ((s, opt), (r, ref_opt)):
        sae.remove_parallel_grad()
        o.step()
        sae.normalise_decoder()
    for p, q in zip(s.parameters(), r.parameters()):
        assert torch.equal(p, q)


def test_relu_manual_backward_reused_buffers_match_autograd():
    """The hand-written step keeps buffers between calls (shared by SAEs of one shape) and
    writes the encoder grads into views of its own storage: over several steps, two SAEs
    stepped in turn, batch-size changes and zero_grad(set_to_none=False), every gradient and
    metric must still equal autograd's."""
    a, b = ReLUSAE(16, 64, seed=3), ReLUSAE(16, 64, seed=5)
    ref_a, ref_b = ReLUSAE(16, 64, seed=3), ReLUSAE(16, 64, seed=5)
    opts = [torch.optim.Adam(s.parameters(), lr=1e-2) for s in (a, b)]
    ref_opts = [torch.optim.Adam(s.parameters(), lr=1e-2) for s in (ref_a, ref_b)]
    for step, n in enumerate((64, 64, 48, 64)):
        x = _data(n=n, seed=step)
        lam = 3e-3 * (step + 1)
        for s, r, o, ro in zip((a, b), (ref_a, ref_b), opts, ref_opts):
            _step_matches_autograd(s, r, o, ro, x, lam, check_l1=True)


def test_relu_manual_backward_zero_sparsity_and_no_firing():
    """λ = 0 and a batch where no latent fires: zero encoder grads, fired all False, l0 = 0."""
    sae = ReLUSAE(16, 32, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
    x = _data(n=32)
    loss, m = sae.compute_grads(x, 0.0)
    assert float(m["l0"]) == 0.0 and not bool(m["fired"].any())
    assert sae.W_enc.grad.abs().max() == 0 and sae.b_enc.grad.abs().max() == 0
    ref = ReLUSAE(16, 32, seed=0)
    with torch.no_grad():
        ref.b_enc.fill_(-1e3)
    lb, _, grads = _autograd_grads(ref, x, 0.0)
    assert torch.allclose(loss, lb, rtol=1e-5)
    for p, g in zip(sae.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)


def test_topk_manual_backward_reused_buffers_match_autograd():
    """The TopK step reuses buffers shared with ReLU SAEs of the same shape (and per-k ones):
    over several steps, a ReLU SAE and two TopK SAEs of different k stepped in turn, batch-size
    changes and zero_grad(set_to_none=False), every gradient and metric equals autograd's."""
    saes = [TopKSAE(16, 64, k=5, seed=4), ReLUSAE(16, 64, seed=1), TopKSAE(16, 64, k=3, seed=6)]
    refs = [TopKSAE(16, 64, k=5, seed=4), ReLUSAE(16, 64, seed=1), TopKSAE(16, 64, k=3, seed=6)]
    with torch.no_grad():
        for i, s in enumerate(saes + refs):
            s.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(i % 3))
            s.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(10 + i % 3))
    opts = [torch.optim.Adam(s.parameters(), lr=1e-2) for s in saes]
    ref_opts = [torch.optim.Adam(s.parameters(), lr=1e-2) for s in refs]
    for step, n in enumerate((64, 64, 48, 64)):
        x = _data(n=n, seed=step)
        for s, r, o, ro in zip(saes, refs, opts, ref_opts):
            _step_matches_autograd(s, r, o, ro, x, 3e-3)


def test_topk_manual_backward_inactive_kept_entries():
    """Tokens whose top-k pre-activations are ≤ 0 keep zeros: L0 < k, no gradient through them,
    and `fired` only counts positive entries — as autograd (ReLU after top-k) has it."""
    x = _data(n=64)
    a, b = TopKSAE(16, 64, k=5, seed=2), TopKSAE(16, 64, k=5, seed=2)
    with torch.no_grad():
        for s in (a, b):
            s.b_enc[:61] = -1e3  # only 3 latents can fire: every token keeps ≥ 2 zeros
            s.b_enc[61] = -0.05
    la, ma = a.compute_grads(x)
    lb, mb, grads = _autograd_grads(b, x, 0.0)
    assert float(ma["l0"]) == float(mb["l0"]) and float(ma["l0"]) <= 3
    assert torch.equal(ma["fired"], mb["fired"]) and not bool(ma["fired"][:61].any())
    assert torch.allclose(la, lb, rtol=1e-5)
    for p, g in zip(a.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)
    assert a.W_enc.grad[:, :61].abs().max() == 0 and a.W_dec.grad[:61].abs().max() == 0


@pytest.mark.parametrize("B,h,k", [(64, 256, 4), (33, 512, 16), (8, 128, 1), (16, 1024, 32)])
def test_two_level_row_topk_matches_torch_topk(B, h, k):
    """The TopK step's two-level selection (chunk maxima, then the top k of the k best
    chunks) returns torch.topk's values and, without ties, its indices — including rows with
    many entries in one chunk, and rows with ties (where the kept values still agree)."""
    from visae.sae.kernels import _row_topk, _row_topk_buffers
    g = torch.Generator().manual_seed(h + k)
    pre = torch.randn(B, h, generator=g)
    pre[0, ::h // 8] += 10  # row 0: the top entries all in one strided chunk
    pre[1, : 2 * k] += 10  # row 1: the top entries all in different chunks
    pre[2] = pre[2].round()  # row 2: many ties, at the k-th value too
    pre[3] = 0.0  # row 3: all equal
    bufs = _row_topk_buffers(B, h, k, pre.dtype)
    assert bufs is not None
    vals, idx = torch.empty(B, k), torch.empty(B, k, dtype=torch.int64)
    _row_topk(pre, k, vals, idx, bufs)
    ref_v, ref_i = pre.topk(k, dim=1)
    assert torch.equal(vals.sort(1, descending=True).values, ref_v)
    assert torch.equal(pre.gather(1, idx), vals)
    assert (idx.sort(1).values.diff(dim=1) > 0).all()  # k distinct latents per row
    exact = [b for b in range(B) if b not in (2, 3)]
    assert torch.equal(idx[exact].sort(1).values, ref_i[exact].sort(1).values)


def test_topk_manual_backward_two_level_selection_matches_autograd():
    """At a width where the step selects in two levels, gradients and metrics are autograd's."""
    x = _data(n=96)
    a, b = TopKSAE(16, 512, k=8, seed=7), TopKSAE(16, 512, k=8, seed=7)
    from visae.sae.kernels import _row_topk_buffers
    assert _row_topk_buffers(96, 512, 8, torch.float32) is not None
    with torch.no_grad():
        for s in (a, b):
            s.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
            s.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        la, ma = a.compute_grads(x)
        lb, mb, grads = _autograd_grads(b, x, 0.0)
        assert torch.allclose(la, lb, rtol=1e-5)
        assert float(ma["l0"]) == float(mb["l0"]) and torch.equal(ma["fired"], mb["fired"])
        for p, g in zip(a.parameters(), grads):
            assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)


def test_topk_manual_backward_width_beyond_uint16_matches_autograd():
    """Latent ids ≥ 2**16 (the radix argsort's key type changes there)."""
    x = _data(n=16, d=4, atoms=8)
    a, b = TopKSAE(4, 70_000, k=3, seed=1), TopKSAE(4, 70_000, k=3, seed=1)
    la, ma = a.compute_grads(x)
    lb, mb, grads = _autograd_grads(b, x, 0.0)
    assert torch.allclose(la, lb, rtol=1e-5)
    assert float(ma["l0"]) == float(mb["l0"]) and torch.equal(ma["fired"], mb["fired"])
    for p, g in zip(a.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)


def test_auxk_loss_value_by_hand():
    """AuxK as Gao et al.'s reference code: α · MSE(ê, e) / MSE(mean_b(e), e), where ê decodes
    the top k_aux dead pre-activations (after ReLU); default k_aux = d/2."""
    assert TopKSAE(16, 64, k=4).k_aux == 8
    sae = TopKSAE(16, 64, k=4, k_aux=3, aux_alpha=0.5, dead_tokens=100)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[2, 5, 9, 30, 41]] = True
    sae.tokens_since_fired[dead] = 1000
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(6, 64, generator=g)
    e = torch.randn(6, 16, generator=g) + 3.0  # an offset the variance ignores
    expected = 0.0
    W = sae.W_dec.detach().double()
    recon = torch.zeros(6, 16, dtype=torch.float64)
    for b in range(6):
        ids = sorted(torch.nonzero(dead).flatten().tolist(), key=lambda j: -float(pre[b, j]))[:3]
        for j in ids:
            recon[b] += max(float(pre[b, j]), 0.0) * W[j]
    ed = e.double()
    expected = 0.5 * float(((recon - ed) ** 2).mean() / ((ed - ed.mean(0)) ** 2).mean())
    assert float(sae.aux_loss(pre, e).detach()) == pytest.approx(expected, rel=1e-5)


def test_matryoshka_loss_sums_prefix_losses():
    x = _data(n=128)
    sae = MatryoshkaSAE(16, 64, k=4, inner="topk")
    loss, m = sae.train_loss(x)
    with torch.no_grad():
        recons = sae.prefix_reconstructions(sae.encode_norm(x))
        expected = sum(float((r - x).pow(2).mean()) for r in recons)
    assert len(recons) == 4 and float(m["aux"]) == 0
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(m["mse_prefix_sum"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("init", ["tied", "tied-0.1", "kaiming"])
def test_batchtopk_inference_l0_is_k_after_a_short_run(init):
    """After 20 steps (20k tokens) the fixed inference threshold gives L0 within 10% of k on
    held-out tokens, from any initialisation."""
    d, k, B, steps = 32, 16, 1024, 20
    x = synth_tokens(make_atoms(d, 128, 0), B * steps + 4096, 4, 0.01, torch.Generator().manual_seed(1))
    mu, s = estimate_normalisation(x)
    sae = BatchTopKSAE(d, 256, k=k, seed=0, init=init)
    sae.set_normalisation(mu, s)
    xn = sae.normalise(x)
    sae.init_b_dec(xn)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for t in range(steps):
        _step(sae, xn[t * B:(t + 1) * B], opt=opt)
    with torch.no_grad():
        l0 = float((sae.eval().encode_norm(xn[-4096:]) != 0).sum(1).float().mean())
    assert abs(l0 - k) <= 0.1 * k, l0


def test_initialisations():
    """tied: W_enc = W_decᵀ; tied-0.1: 0.1 W_decᵀ; kaiming (the paper's): torch's
    kaiming_uniform_ on W_enc [d, h], then W_dec [h, d], from the seed; decoder rows unit-norm."""
    tied, small, paper = (ReLUSAE(16, 64, seed=3, init=i) for i in ("tied", "tied-0.1", "kaiming"))
    assert torch.equal(tied.W_enc, tied.W_dec.t()) and torch.equal(small.W_dec, tied.W_dec)
    assert torch.allclose(small.W_enc, 0.1 * small.W_dec.t())
    g = torch.Generator().manual_seed(3)
    w_enc = torch.nn.init.kaiming_uniform_(torch.empty(16, 64), generator=g)
    w_dec = torch.nn.init.kaiming_uniform_(torch.empty(64, 16), generator=g)
    assert torch.equal(paper.W_enc, w_enc) and w_enc.abs().max() <= (6 / 64) ** 0.5
    assert torch.allclose(paper.W_dec, w_dec / w_dec.norm(dim=1, keepdim=True))
    for sae in (tied, small, paper):
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    with pytest.raises(ValueError, match="allowed: tied-0.1, tied, kaiming"):
        ReLUSAE(16, 64, init="xavier")


def test_default_init_recovers_planted_atoms_better_than_tied():
    """ReLU-L1 on a planted dictionary, identical batches: the default init finds the atoms
    (mean best cosine) better than the full-scale tied init visae used before."""
    from visae.tools.synth import recovery
    d, h, B, steps = 16, 128, 512, 150
    atoms = make_atoms(d, 32, 0)
    x = synth_tokens(atoms, B * steps, 3, 0.01, torch.Generator().manual_seed(1))
    mu, s = estimate_normalisation(x)
    scores = {}
    for init in ("tied", INITS[0]):
        sae = ReLUSAE(d, h, seed=0, init=init)
        sae.set_normalisation(mu, s)
        xn = sae.normalise(x)
        sae.init_b_dec(xn)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for t in range(steps):
            _step(sae, xn[t * B:(t + 1) * B], lam=1e-2, opt=opt)
        scores[init] = recovery(atoms.numpy(), sae.W_dec.detach().numpy())["mean_best_cos"]
    assert scores[INITS[0]] >= scores["tied"] + 0.1, scores

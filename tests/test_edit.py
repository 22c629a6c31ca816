"""The residual-stream edit: the fast form equals the paper's formula, a no-op edit changes
nothing, token masks select what they say, and encode_some equals encode's columns."""

from __future__ import annotations

import pytest
import torch

from visae.errors import VisaeError
from visae.models import load_backbone
from visae.models.edit import DirectionEdit, LatentEdit, token_mask
from visae.sae.modules import CLASSES, build_sae, estimate_normalisation
from visae.store.meta import TokenLayout

pytestmark = pytest.mark.usefixtures("one_thread")

D, H = 16, 64
TINY = {"source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 28,
        "model_kwargs": {"patch_size": 4, "depth": 3, "embed_dim": D, "num_heads": 2}}


def _tokens(shape=(3, 5), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D, generator=g) * 2.0 + 0.5


def _sae(architecture: str, x: torch.Tensor, seed: int = 0):
    """An SAE of each kind with a fitted normalisation, random biases and (where it has one) a
    threshold set, in eval mode: as a loaded checkpoint runs."""
    sae = build_sae(architecture, D, H, seed=seed, k=4)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.set_normalisation(*estimate_normalisation(x.reshape(-1, D)))
        sae.b_enc.copy_(torch.randn(H, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
        if hasattr(sae, "theta"):
            sae.theta.copy_(torch.rand(H, generator=g) * 0.2)
    return sae.eval()


@pytest.mark.parametrize("architecture", sorted(CLASSES))
def test_fast_edit_equals_the_literal_formula(architecture):
    x = _tokens()
    sae = _sae(architecture, x)
    latents, values = [3, 17, 40], [0.0, 2.5, -1.0]
    mask = token_mask(TokenLayout(1, 0, (2, 2)), "patches")
    with torch.no_grad():
        f = sae.encode(x)
        f_edit = f.clone()
        f_edit[..., latents] = torch.tensor(values)
        literal = (x - sae.decode(f)) + sae.decode(f_edit)
    out = LatentEdit(sae, latents, values, mask)(x)
    torch.testing.assert_close(out[:, mask], literal[:, mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, ~mask], x[:, ~mask])


@pytest.mark.parametrize("architecture", sorted(CLASSES))
def test_encode_some_equals_the_columns_of_encode(architecture):
    x = _tokens((4, 7))
    sae = _sae(architecture, x, seed=2)
    latents = [5, 0, 63, 5, 31]
    with torch.no_grad():
        full = sae.encode(x)
        some = sae.encode_some(x, latents)
    assert some.shape == (4, 7, len(latents))
    assert (full[..., latents] > 0).any()
    torch.testing.assert_close(some, full[..., latents], rtol=1e-5, atol=1e-6)
    assert sae.encode_some(x, []).shape == (4, 7, 0)


def test_batchtopk_without_a_threshold_falls_back_to_the_batch_rule():
    x = _tokens((4, 7))
    sae = _sae("batchtopk", x)
    sae.threshold.fill_(-1.0)  # not estimated: inference keeps the batch's top k·B
    with torch.no_grad():
        torch.testing.assert_close(sae.encode_some(x, [1, 2]), sae.encode(x)[..., [1, 2]])


def test_token_masks():
    layout = TokenLayout(1, 2, (2, 3))  # CLS, 2 registers, 6 patches
    assert token_mask(layout, "cls").tolist() == [True] + [False] * 8
    assert token_mask(layout, "patches").tolist() == [False] * 3 + [True] * 6
    assert token_mask(layout, "all").all() and token_mask(layout, "all").shape == (9,)
    with pytest.raises(VisaeError, match="^the model has no CLS token"):
        token_mask(TokenLayout(0, 0, (2, 2)), "cls")
    with pytest.raises(VisaeError, match="^unknown token selection 'heads'"):
        token_mask(layout, "heads")


def test_per_image_masks_edit_only_their_tokens():
    x = _tokens((2, 5))
    sae = _sae("relu", x)
    mask = torch.tensor([[False, True, False, False, False], [False, False, False, True, True]])
    out = LatentEdit(sae, [1, 2], [3.0, 3.0], mask)(x)
    changed = (out != x).any(-1)
    assert torch.equal(changed, mask)
    with pytest.raises(VisaeError, match=r"token mask \[3, 5\] does not fit tokens \[2, 5, 16\]"):
        LatentEdit(sae, [1], [0.0], torch.ones(3, 5, dtype=torch.bool))(x)


def test_latents_out_of_range_are_one_line():
    sae = _sae("relu", _tokens())
    with pytest.raises(VisaeError, match=r"^latent 64 is out of range for an SAE of 64 latents \(0..63\)$"):
        LatentEdit(sae, [1, 64], [0.0, 0.0], torch.ones(5, dtype=torch.bool))


def test_direction_edit_moves_each_token_as_far_as_the_latent_edit():
    x = _tokens((2, 5))
    sae = _sae("relu", x)
    mask = torch.tensor([False, True, True, True, True])
    latent = LatentEdit(sae, [7], [4.0], mask)
    direction = torch.randn(D, generator=torch.Generator().manual_seed(5))
    out = DirectionEdit(direction, latent.delta_norm, mask)(x)
    moved = (out - x).norm(dim=-1)
    torch.testing.assert_close(moved, (latent(x) - x).norm(dim=-1), rtol=1e-4, atol=1e-5)
    step = (out - x)[0, 1]
    assert torch.allclose(step / step.norm(), direction / direction.norm(), atol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])


def test_a_no_op_edit_leaves_the_final_tokens_equal():
    bb = load_backbone(TINY)
    layer = 1
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    resid = bb.record(pixels, [layer])[layer]
    sae = _sae("topk", resid)
    mask = token_mask(bb.layout, "all")
    plain = bb.final_tokens(pixels)
    with torch.no_grad():
        own = sae.encode(resid)[..., [2, 9, 30]]
    kept = bb.final_tokens(pixels, edit=LatentEdit(sae, [2, 9, 30], own, mask), layer=layer)
    empty = bb.final_tokens(pixels, edit=LatentEdit(sae, [], [], mask), layer=layer)
    torch.testing.assert_close(kept, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(empty, plain, rtol=0, atol=0)
    moved = bb.final_tokens(pixels, edit=LatentEdit(sae, [2, 9, 30], [5.0, 5.0, 5.0], mask), layer=layer)
    assert (moved - plain).abs().max() > 1e-2

"""Edits of the residual stream at one block, for `Backbone.final_tokens(pixels, edit=..., layer=L)`.

`LatentEdit` is the paper's intervention: on the selected tokens, x becomes (x - x̂) + decode(f'),
f' being the SAE's code f with a few latents set to chosen values, so the reconstruction error
is kept. Because decode is affine in f, that is x + (f'_J - f_J) W_dec[J] · scale: only the
edited latents' codes and decoder rows are needed, which keeps an edited forward pass about as
fast as a plain one. `DirectionEdit` adds a fixed direction scaled per token to a given norm
(the random-direction baseline, matched to a latent edit's per-token norm).
"""

from __future__ import annotations

from typing import Callable

import torch

from visae.errors import VisaeError

WHERE = ("patches", "cls", "all")


def token_mask(layout, where: str) -> torch.Tensor:
    """bool [n_tokens]: the patch tokens, the CLS token, or every token of `layout`'s sequence."""
    mask = torch.zeros(layout.n_tokens, dtype=torch.bool)
    if where == "patches":
        mask[layout.n_prefix:] = True
    elif where == "cls":
        if layout.n_cls < 1:
            raise VisaeError("the model has no CLS token: edit the patches or all tokens")
        mask[0] = True
    elif where == "all":
        mask[:] = True
    else:
        raise VisaeError(f"unknown token selection {where!r}: use one of {', '.join(WHERE)}")
    return mask


def _selected(tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mask [T] or [B, T] as [B or 1, T, 1] on x's device, checked against x [B, T, d]."""
    tokens = torch.as_tensor(tokens, dtype=torch.bool, device=x.device)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.shape[1] != x.shape[1] or tokens.shape[0] not in (1, x.shape[0]):
        raise VisaeError(f"token mask {list(tokens.shape)} does not fit tokens {list(x.shape)}: "
                         f"give [T] or [B, T] with T = {x.shape[1]}")
    return tokens.unsqueeze(-1)


class LatentEdit:
    """x -> x + decode(f') - decode(f) on the selected tokens, f' = f with `latents` set to `values`.

    `values`: one per latent ([J], or anything broadcastable to [B, T, J]). `tokens`: bool [T]
    or [B, T]. `current`: the codes f_J [B, T, J] of the tokens the edit will see, when the caller
    has them already (many edits of one batch), else the SAE computes them. Works in the SAE's
    dtype and returns x's dtype; the SAE must be on x's device.
    """

    def __init__(self, sae, latents, values, tokens: torch.Tensor, current: torch.Tensor | None = None):
        self.sae = sae
        ids = torch.as_tensor(list(latents), dtype=torch.long).reshape(-1)
        bad = ids[(ids < 0) | (ids >= sae.width)]
        if bad.numel():
            raise VisaeError(f"latent {int(bad[0])} is out of range for an SAE of {sae.width} latents (0..{sae.width - 1})")
        device, dtype = sae.W_dec.device, sae.W_dec.dtype
        self.latents = ids.to(device)
        self.values = torch.as_tensor(values, dtype=dtype, device=device)
        with torch.no_grad():
            self.rows = sae.W_dec[self.latents].detach() * sae.scale  # [J, d]: raw-space decoder rows
        self.tokens = torch.as_tensor(tokens, dtype=torch.bool)
        self.current = current

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d] in the SAE's dtype: what the edit adds (zero on tokens it leaves alone)."""
        x = x.to(self.rows.dtype)
        if not self.latents.numel():
            return torch.zeros_like(x)
        with torch.no_grad():
            f = self.sae.encode_some(x, self.latents) if self.current is None else self.current  # [B, T, J]
            change = (self.values - f) @ self.rows
        return torch.where(_selected(self.tokens, x), change, 0.0)

    def delta_norm(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T]: the edit's L2 norm on each token (0 where it leaves the token alone)."""
        return self.delta(x).norm(dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.rows.dtype) + self.delta(x)).to(x.dtype)


class DirectionEdit:
    """x -> x + norm · u on the selected tokens, u = `direction` [d] made unit length.

    `norm`: a tensor broadcastable to [B, T], or a function of the tokens x returning [B, T]
    (e.g. a LatentEdit's `delta_norm`, so the direction moves each token as far as that edit does).
    """

    def __init__(self, direction: torch.Tensor, norm: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                 tokens: torch.Tensor):
        direction = torch.as_tensor(direction, dtype=torch.float32).reshape(-1)
        length = float(direction.norm())
        if not length > 0:
            raise VisaeError("a direction edit needs a non-zero direction")
        self.direction = direction / length
        self.norm = norm
        self.tokens = torch.as_tensor(tokens, dtype=torch.bool)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm(x) if callable(self.norm) else torch.as_tensor(self.norm)
        norm = norm.to(device=x.device, dtype=torch.float32)
        change = norm.unsqueeze(-1) * self.direction.to(x.device)
        return (x.float() + torch.where(_selected(self.tokens, x), change, 0.0)).to(x.dtype)

"""A loaded vision backbone and the one thing visae needs from it: the residual stream.

Every source (open_clip, timm, visae's own pretrained ViTs) is reduced to the same shape: a stack
of transformer blocks, a function that runs the network, and a token layout. `record` hooks the
blocks, so the numbers are exactly what the model computes, and aborts the forward pass after the
deepest requested block, so extracting an early layer does not pay for the whole network.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from visae.errors import VisaeError
from visae.store.meta import TokenLayout  # defined beside the store layout that records it


class _StopForward(Exception):
    """Raised from the hook on the deepest requested block to skip the rest of the network."""


# Transform steps that change pixel values only; masks pass through them untouched.
_VALUE_ONLY_STEPS = {
    "ToTensor", "MaybeToTensor", "PILToTensor", "MaybePILToTensor", "Normalize",
    "MaybeConvertMode", "_convert_to_rgb", "ConvertImageDtype", "ToNumpy", "ToDtype",
}
# Transform steps that move pixels; masks go through them with nearest-neighbour sampling.
_GEOMETRIC_STEPS = {"Resize", "CenterCrop", "ResizeKeepRatio", "CenterCropOrPad"}


class Backbone:
    """A ViT in eval mode with its own preprocessing, token layout and a residual-stream recorder."""

    def __init__(
        self,
        *,
        name: str,
        source: str,
        arch: str,
        model: torch.nn.Module,
        transform: Callable,
        image_size: tuple[int, int],
        patch_size: tuple[int, int],
        d_model: int,
        layout: TokenLayout,
        blocks: torch.nn.ModuleList,
        run: Callable[[torch.Tensor], Any],
        batch_first: bool = True,
        pretrained: str | None = None,
        weights: str | None = None,
        final_norm: torch.nn.Module | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.arch = arch
        self.model = model.eval()
        self.transform = transform
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.d_model = int(d_model)
        self.n_layers = len(blocks)
        self.layout = layout
        self.pretrained = pretrained
        self.weights = weights
        self.activation = mlp_activation(blocks[0])
        # Set by `load_backbone`: what made the weights (see registry._identity).
        self.identity: dict[str, Any] | None = None
        self._blocks = blocks
        self._run = run
        # The norm the model applies to its last block's tokens (what its own head reads).
        self.final_norm = final_norm if final_norm is not None else torch.nn.Identity()
        self._batch_first = batch_first

    def __repr__(self) -> str:
        return (f"Backbone({self.name!r}, source={self.source!r}, arch={self.arch!r}, "
                f"d_model={self.d_model}, n_layers={self.n_layers}, layout={self.layout})")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device) -> "Backbone":
        self.model.to(device)
        return self

    def to_dict(self) -> dict[str, Any]:
        """What an activation store records about the model (meta.json, `visae models show`)."""
        return {
            "name": self.name,
            "source": self.source,
            "arch": self.arch,
            "pretrained": self.pretrained,
            "weights": self.weights,
            "image_size": list(self.image_size),
            "patch_size": list(self.patch_size),
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "layout": self.layout.to_dict(),
            "transform": repr(self.transform),
            "activation": self.activation,
            "identity": self.identity,
        }

    def resolve_layer(self, layer: int) -> int:
        """Block index in 0..n_layers-1; negative counts from the end, as in Python indexing."""
        n = self.n_layers
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise VisaeError(f"layer must be an integer, got {layer!r} for {self.name}")
        layer = int(layer)
        if not -n <= layer < n:
            raise VisaeError(
                f"layer {layer} is out of range for {self.name} ({n} blocks): "
                f"use 0..{n - 1} or -{n}..-1"
            )
        return layer % n

    def record(self, pixels: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """Residual stream after each requested block, keyed by the resolved block index.

        Shape [B, n_tokens, d_model], tokens in `layout` order. Blocks after the deepest one
        requested never run.
        """
        if not layers:
            raise VisaeError("record needs at least one layer")
        wanted = sorted({self.resolve_layer(layer) for layer in layers})
        deepest = wanted[-1]
        if pixels.ndim != 4:
            raise VisaeError(f"expected pixels shaped [B, 3, H, W], got {list(pixels.shape)}")
        out: dict[int, torch.Tensor] = {}

        def make_hook(idx: int):
            def hook(_module, _args, output):
                x = output[0] if isinstance(output, (tuple, list)) else output
                if not self._batch_first:
                    x = x.transpose(0, 1)
                out[idx] = x.clone()
                if idx == deepest:
                    raise _StopForward
            return hook

        self._run_hooked(pixels, [(i, make_hook(i)) for i in wanted])
        expected = (pixels.shape[0], self.layout.n_tokens, self.d_model)
        for idx, x in out.items():
            if tuple(x.shape) != expected:
                raise VisaeError(
                    f"{self.name} block {idx} produced {list(x.shape)}, expected {list(expected)}: "
                    f"is the input {list(pixels.shape[-2:])} the model's image size {list(self.image_size)}?"
                )
        return out

    def final_tokens(self, pixels: torch.Tensor, *, edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     layer: int | None = None) -> torch.Tensor:
        """Tokens after the last block and the model's final norm, [B, n_tokens, d_model]: what
        the task probes read.

        With `edit`, the output of block `layer` ([B, n_tokens, d_model], batch first) is replaced
        by `edit(output)` before the rest of the network runs: the intervention. The model's own
        head never runs.
        """
        if pixels.ndim != 4:
            raise VisaeError(f"expected pixels shaped [B, 3, H, W], got {list(pixels.shape)}")
        last = self.n_layers - 1
        at = self.resolve_layer(layer) if edit is not None else None
        out: dict[str, torch.Tensor] = {}

        def edit_hook(_module, _args, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            y = edit(x if self._batch_first else x.transpose(0, 1))
            if tuple(y.shape) != tuple(x.shape if self._batch_first else x.transpose(0, 1).shape):
                raise VisaeError(f"the edit at block {at} changed the tokens' shape to {list(y.shape)}")
            y = y.to(x.dtype) if self._batch_first else y.to(x.dtype).transpose(0, 1)
            return (y, *output[1:]) if isinstance(output, (tuple, list)) else y

        def last_hook(_module, _args, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            out["x"] = x if self._batch_first else x.transpose(0, 1)
            raise _StopForward

        hooks = [(at, edit_hook)] if edit is not None else []
        self._run_hooked(pixels, hooks + [(last, last_hook)])  # the edit's first, if on the same block
        with torch.inference_mode():
            return self.final_norm(out["x"])

    def _run_hooked(self, pixels: torch.Tensor, hooks: list) -> None:
        """Run the network on `pixels` with forward hooks (block index, hook) in place, in that
        order; a hook that raises _StopForward ends the pass there."""
        handles = [self._blocks[i].register_forward_hook(hook) for i, hook in hooks]
        try:
            with torch.inference_mode():
                self._run(pixels.to(device=self.device, dtype=self.dtype))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    def tokens_after(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        """Final tokens (after the final norm) from the residual stream `resid` [B, T, d] after block
        `layer`, running only the blocks after it: many edits of one batch then share its first
        blocks. Exact where the blocks take only the token stream (timm, open_clip image towers);
        `final_tokens(pixels, edit=..., layer=...)` is the reference a caller can check it against."""
        start = self.resolve_layer(layer) + 1
        with torch.inference_mode():
            h = resid if self._batch_first else resid.transpose(0, 1)
            for block in self._blocks[start:]:
                out = block(h)
                h = out[0] if isinstance(out, (tuple, list)) else out
            return self.final_norm(h if self._batch_first else h.transpose(0, 1))

    def mask_transform(self, mask: np.ndarray, fill: int = 0) -> np.ndarray:
        """Apply the image transform's geometry (resize/crop/pad) to a label mask, nearest-neighbour.

        Derived from the transform's own steps, so patches and mask pixels line up whatever the
        model's preprocessing is. `fill` labels pixels that padding adds.
        """
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise VisaeError(f"a label mask must be 2-D (H, W), got shape {list(mask.shape)}")
        if mask.dtype == bool:
            mask = mask.astype(np.int32)
        if not np.issubdtype(mask.dtype, np.integer):
            raise VisaeError(f"a label mask must hold integers, got dtype {mask.dtype}")
        if mask.size and (mask.min() < np.iinfo(np.int32).min or mask.max() > np.iinfo(np.int32).max):
            raise VisaeError("mask labels must fit in int32")
        img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.int32))  # PIL mode "I"
        steps = getattr(self.transform, "transforms", [self.transform])
        for step in steps:
            kind = getattr(step, "__name__", None) or type(step).__name__
            if kind in _VALUE_ONLY_STEPS:
                continue
            if kind not in _GEOMETRIC_STEPS:
                raise VisaeError(
                    f"cannot map transform step {kind} of {self.name} onto label masks "
                    f"(known geometric steps: {', '.join(sorted(_GEOMETRIC_STEPS))})"
                )
            step = copy.copy(step)
            if hasattr(step, "interpolation"):
                step.interpolation = _nearest()
            if hasattr(step, "fill"):
                step.fill = fill
            img = step(img)
        out = np.asarray(img, dtype=np.int64)
        if out.shape != self.image_size:
            raise VisaeError(
                f"mask transform of {self.name} gave {list(out.shape)}, expected {list(self.image_size)}"
            )
        return out


def mlp_activation(block: torch.nn.Module) -> str:
    """The MLP nonlinearity of a transformer block, by class name (QuickGELU or GELU matters for
    CLIP: its weights only fit the one they were trained with). open_clip names it `gelu`, timm `act`."""
    mlp = getattr(block, "mlp", None)
    act = getattr(mlp, "act", None) or getattr(mlp, "gelu", None)
    if act is None:
        return "unknown"
    approximate = getattr(act, "approximate", "none")
    return type(act).__name__ + (f"(approximate={approximate})" if approximate != "none" else "")


def _nearest():
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.NEAREST

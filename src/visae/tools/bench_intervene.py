"""The `intervene` benchmark: what the edit costs inside the model.

Edited forward passes per second (`Backbone.final_tokens` with a `LatentEdit` of one latent on
every patch token at one block) against plain `final_tokens` passes of the same batch, in the same
run. The two are timed in alternation over several rounds, and the ratio is the median of the
per-round ratios (as the `train` bench does), so a change in a shared machine's load hits both.
Default: the paper's shapes, a random-init open_clip ViT-B/16 at 224 px, layer -2 and a ReLU SAE
of expansion 32 (width 24,576 on d = 768) with its normalisation set from the batch's activations.
"""

from __future__ import annotations

import math
import time

import torch

from visae.tools.bench_train import interleaved, median

GOALS = {"edited_vs_plain": 0.75}
MIN_TIMED_S = 0.1  # each timed call runs enough passes to last about this long


def bench_intervene(source: str = "open_clip", arch: str = "ViT-B-16", image_size: int | None = 224,
                    model_kwargs: dict | None = None, layer: int = -2, architecture: str = "relu",
                    expansion: int = 32, k: int | None = None, batch: int = 8, rounds: int = 5,
                    passes: int | None = None, threads: int | None = 2, device: str = "cpu",
                    seed: int = 0) -> dict:
    """Run the benchmark; returns the JSON object (bench, device, params, ratios, goals, raw figures)."""
    from visae.models import load_backbone
    from visae.models.edit import LatentEdit, token_mask
    from visae.provenance import device_info
    from visae.sae.modules import build_sae, estimate_normalisation

    if threads:
        torch.set_num_threads(int(threads))
    spec = {"source": source, "arch": arch, **({"image_size": image_size} if image_size else {}),
            **({"model_kwargs": model_kwargs} if model_kwargs else {})}
    backbone = load_backbone(spec).to(device)
    block = backbone.resolve_layer(layer)
    width = backbone.d_model * expansion
    from visae.errors import VisaeError
    from visae.sae.config import ARCH_KEYS

    if "k" in ARCH_KEYS[architecture] and k is None:
        raise VisaeError(f"a {architecture} SAE needs --k (the latents kept per token)")
    sae = build_sae(architecture, backbone.d_model, width, seed=seed, k=k).to(device).eval()
    pixels = torch.randn(batch, 3, *backbone.image_size, generator=torch.Generator().manual_seed(seed)).to(device)
    acts = backbone.record(pixels, [block])[block]
    sae.set_normalisation(*estimate_normalisation(acts.reshape(-1, backbone.d_model).float()))
    patches = token_mask(backbone.layout, "patches")
    with torch.no_grad():  # the latent most active on the patches, suppressed: a real edit
        latent = int(sae.encode(acts[:, patches].float()).mean((0, 1)).argmax())
    edit = LatentEdit(sae, [latent], [0.0], patches)

    def synced(fn):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        out = fn()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return out

    plain_once = lambda: backbone.final_tokens(pixels)  # noqa: E731
    edited_once = lambda: backbone.final_tokens(pixels, edit=edit, layer=block)  # noqa: E731
    t = time.perf_counter()
    change = float((synced(edited_once) - synced(plain_once)).abs().max())  # the warm-up: did the edit act?
    warmup_s = (time.perf_counter() - t) / 2
    passes = passes or max(1, math.ceil(MIN_TIMED_S / max(warmup_s, 1e-9)))

    def repeated(once):
        def run():
            for _ in range(passes):
                once()
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
        return run

    times = interleaved({"plain": repeated(plain_once), "edited": repeated(edited_once)}, rounds)
    ratio = median([p / e for p, e in zip(times["plain"], times["edited"])])
    plain_ps, edited_ps = passes / min(times["plain"]), passes / min(times["edited"])
    return {
        "bench": "intervene", "device": device_info(),
        "params": {"source": source, "arch": arch, "image_size": list(backbone.image_size),
                   "model_kwargs": model_kwargs or {}, "layer": layer, "block": block, "d_model": backbone.d_model,
                   "n_tokens": backbone.layout.n_tokens, "architecture": architecture, "expansion": expansion,
                   "width": width, "k": k, "latent": latent, "value": 0.0, "tokens": "patches", "batch": batch,
                   "rounds": rounds, "passes_per_round": passes, "threads": torch.get_num_threads(), "seed": seed},
        "ratios": {"edited_vs_plain": ratio}, "goals": dict(GOALS),
        "passes_per_s": {"plain": plain_ps, "edited": edited_ps},
        "images_per_s": {"plain": plain_ps * batch, "edited": edited_ps * batch},
        "edited_vs_plain_best_of": edited_ps / plain_ps,
        "edit_max_abs_change": change,
        "round_s": times,  # per round, in turns, each `passes_per_round` passes: the median ratio comes from these
    }

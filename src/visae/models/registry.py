"""Turn a model spec (one `models:` config entry) into a `Backbone`.

Sources: `open_clip` (CLIP and SigLIP, visual tower only), `timm` (any ViT, incl. DINOv2 with
registers), `pretrain` (a timm ViT trained by `visae pretrain`; local weights required).
Weights come from a hub tag or a local file; every failure a user can fix (no network, a missing
or mismatched file, a typo in the architecture) is a one-line `VisaeError`.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from visae.errors import VisaeError
from visae.models.backbone import Backbone, TokenLayout

SOURCES = ("open_clip", "timm", "pretrain")
# The keys of a model spec this module reads (a config entry may carry others).
SPEC_KEYS = ("source", "arch", "pretrained", "weights", "name", "image_size", "model_kwargs", "init_seed",
             "crop_pct", "crop_mode", "interpolation")
HUB_PROBE_TIMEOUT_S = 3.0
# Preprocessing a model entry may override (timm's names; the paper's DINOv2 is Resize(256) +
# CenterCrop(224), bilinear: crop_pct 0.875, crop_mode center, interpolation bilinear).
CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("bilinear", "bicubic")


# --------------------------------------------------------------------------- spec parsing

def parse_model_arg(text: str) -> dict[str, Any]:
    """`SOURCE:ARCH[@TAG]` -> spec. timm's own `ARCH.TAG` also names the hub tag.

    Examples: `open_clip:ViT-B-16@openai`, `timm:vit_base_patch14_reg4_dinov2.lvd142m`,
    `timm:vit_small_patch14_dinov2` (no tag: random init unless weights are given).
    """
    source, sep, rest = str(text).strip().partition(":")
    if not sep or not rest:
        raise VisaeError(
            f"model {text!r} must look like SOURCE:ARCH[@TAG], e.g. open_clip:ViT-B-16@openai or "
            f"timm:vit_base_patch14_reg4_dinov2.lvd142m (sources: {', '.join(SOURCES)})"
        )
    _check_source(source)
    arch, _, tag = rest.partition("@")
    pretrained = tag or None
    if source in ("timm", "pretrain") and pretrained is None and "." in arch:
        pretrained = arch.split(".", 1)[1]
    return {"source": source, "arch": arch, "pretrained": pretrained, "weights": None,
            "name": None, "image_size": None}


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise VisaeError(f"unknown model source {source!r}: use one of {', '.join(SOURCES)}")


def _check_weights_file(path: str | os.PathLike) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise VisaeError(f"weights file {p} does not exist (set weights: to a readable local file)")
    return str(p)


def _no_download_msg(source: str, arch: str, tag: str) -> str:
    return (
        f"cannot download weights {tag!r} for {source} {arch} (no network?): download them where a "
        f"network is available and set weights: /path/to/file in the model's config entry "
        f"(CLI: --weights PATH)"
    )


def _mismatch_msg(path: str, source: str, arch: str, err: BaseException) -> str:
    return f"weights file {path} does not fit {source} {arch}: {_summarise_load_error(err)}"


def _summarise_load_error(err: BaseException) -> str:
    """One line out of torch's many-line load_state_dict error."""
    text = str(err)
    m = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) "
                  r"from checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))", text)
    parts = []
    if m:
        n = text.count("size mismatch for ")
        parts.append(f"{n} shape mismatch(es), e.g. {m.group(1)}: file {m.group(2)[len('torch.Size('):-1]} "
                     f"vs model {m.group(3)[len('torch.Size('):-1]}")
    for label, pat in (("missing", r'Missing key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)'),
                       ("unexpected", r'Unexpected key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)')):
        km = re.search(pat, text)
        if km:
            keys = re.findall(r'"([^"]*)"', km.group(1))
            parts.append(f"{len(keys)} {label} key(s), e.g. {keys[0]}")
    if parts:
        return "; ".join(parts)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


@contextlib.contextmanager
def _hub_access():
    """Fail fast when the hub is unreachable instead of retrying for a minute.

    When a short TCP probe of the hub endpoint fails, huggingface_hub is switched to offline mode
    for this call, so files already in the local cache still load.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - both libraries depend on it
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    if not saved:
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        port = urlparse(constants.ENDPOINT).port or 443
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        except OSError:
            constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _close_matches(arch: str, names: list[str]) -> str:
    lowered = {n.lower(): n for n in names}
    hits = difflib.get_close_matches(arch.lower(), list(lowered), n=5, cutoff=0.6)
    hits = [lowered[h] for h in hits]
    return f"; close matches: {', '.join(hits)}" if hits else ""


# --------------------------------------------------------------------------- entry point

def load_backbone(spec: dict[str, Any]) -> Backbone:
    """Build the backbone a spec names, in eval mode on CPU, with its own preprocessing.

    `pretrained` names hub weights; `weights` is a local file and wins over downloading (the tag
    then only selects preprocessing). Neither: random init (tests, architecture inspection).
    """
    if not isinstance(spec, dict):
        raise VisaeError(f"a model spec must be a mapping, got {type(spec).__name__}")
    # Other keys of a config entry (descriptions, per-model extraction settings) are not ours:
    # the config schema checks them.
    source = spec.get("source")
    _check_source(source)
    arch = spec.get("arch")
    if not arch or not isinstance(arch, str):
        raise VisaeError(f"model spec for source {source} needs arch: (a model name)")
    image_size = spec.get("image_size")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):
        raise VisaeError(f"image_size must be a positive integer, got {image_size!r}")
    weights = spec.get("weights")
    if weights is not None:
        weights = _check_weights_file(weights)
    if source == "pretrain" and weights is not None:
        spec = with_pretrain_architecture(spec, weights)
        arch, image_size = spec["arch"], spec.get("image_size")
    model_kwargs = dict(spec.get("model_kwargs") or {})
    pretrained = spec.get("pretrained")
    if source == "open_clip" and model_kwargs:
        raise VisaeError("model_kwargs is only supported for timm and pretrain sources")
    if source == "pretrain" and weights is None:
        raise VisaeError(
            f"source pretrain needs weights: the checkpoint written by `visae pretrain` for {arch}"
        )
    preprocess = _preprocess_options(spec, source)
    # Random init is seeded (init_seed, default 0) so that every process builds the same model.
    init_seed = spec.get("init_seed", 0)
    if isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0:
        raise VisaeError(f"init_seed must be a non-negative integer, got {init_seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if source == "open_clip":
            bb = _load_open_clip(arch, pretrained, weights, image_size, preprocess)
        else:
            bb = _load_timm(source, arch, pretrained, weights, image_size, model_kwargs, preprocess)
    bb.name = spec.get("name") or bb.name
    bb.identity = _identity(bb, weights, init_seed, model_kwargs)
    return bb


def _preprocess_options(spec: dict[str, Any], source: str) -> dict[str, Any]:
    """The entry's crop_pct / crop_mode / interpolation, checked; None where the weights' own apply."""
    crop_pct, crop_mode, interp = (spec.get(k) for k in ("crop_pct", "crop_mode", "interpolation"))
    if crop_pct is not None and (isinstance(crop_pct, bool) or not isinstance(crop_pct, int | float)
                                 or not 0 < crop_pct <= 1):
        raise VisaeError(f"crop_pct must be a number in (0, 1], e.g. 0.875 for Resize(256) + CenterCrop(224); "
                         f"got {crop_pct!r}")
    if crop_mode is not None and crop_mode not in CROP_MODES:
        raise VisaeError(f"crop_mode must be one of {', '.join(CROP_MODES)}; got {crop_mode!r}")
    if interp is not None and interp not in INTERPOLATIONS:
        raise VisaeError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interp!r}")
    if source == "open_clip" and (crop_pct is not None or crop_mode is not None):
        raise VisaeError("crop_pct and crop_mode are only supported for timm and pretrain sources "
                         "(open_clip resizes as its pretrained config says)")
    return {"crop_pct": crop_pct, "crop_mode": crop_mode, "interpolation": interp}


def _identity(bb: Backbone, weights: str | None, init_seed: int, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What makes this model's activations what they are: a store records it, and a store made
    by a model with another identity is never resumed or reused. The weights' path is left out
    (the same file may move); their sha256 is in."""
    from visae.store.format import sha256_file

    random_init = weights is None and bb.pretrained is None
    return {
        "source": bb.source, "arch": bb.arch, "pretrained": bb.pretrained,
        "weights_sha256": sha256_file(Path(weights)) if weights is not None else None,
        "init_seed": init_seed if random_init else None,
        "model_kwargs": model_kwargs, "image_size": list(bb.image_size),
        "activation": bb.activation,
        "transform": " ".join(repr(bb.transform).split()),  # one line, so messages stay one line
    }


def with_pretrain_architecture(spec: dict[str, Any], weights: str) -> dict[str, Any]:
    """A `visae pretrain` checkpoint states its own architecture in the config.json beside it
    (e.g. the supervised model's 10-class head); that wins over the config entry."""
    import json

    config = Path(weights).with_name("config.json")
    if not config.is_file():
        return spec
    try:
        saved = json.loads(config.read_text()).get("model_spec") or {}
    except ValueError:
        raise VisaeError(f"{config} is not valid JSON") from None
    keys = ("arch", "image_size", "model_kwargs")
    return {**spec, **{k: saved[k] for k in keys if k in saved}}


# --------------------------------------------------------------------------- open_clip

def _open_clip_preprocess_cfg(open_clip, arch: str, tag: str | None) -> dict[str, Any]:
    """Preprocessing of the weights a tag names; without a tag, what all known tags agree on.

    open_clip uses CLIP's mean/std for random init, which is wrong for e.g. SigLIP.
    """
    keys = ("mean", "std", "interpolation", "resize_mode")
    if tag:
        cfgs = [open_clip.get_pretrained_cfg(arch, tag)]
    else:
        cfgs = [open_clip.get_pretrained_cfg(arch, t) for t in open_clip.list_pretrained_tags_by_model(arch)]
    merged: dict[str, Any] = {}
    for k in keys:
        vals = {repr(c.get(k)) for c in cfgs if c and c.get(k) is not None}
        if len(vals) == 1:
            merged[k] = next(c[k] for c in cfgs if c and c.get(k) is not None)
    return {
        "image_mean": merged.get("mean"),
        "image_std": merged.get("std"),
        "image_interpolation": merged.get("interpolation"),
        "image_resize_mode": merged.get("resize_mode"),
    }


def open_clip_quick_gelu(open_clip, arch: str, tag: str | None) -> bool:
    """Whether the weights a tag names were trained with QuickGELU (OpenAI's CLIP, DFN, MetaCLIP).

    open_clip's plain configs (ViT-B-16) build GELU and only warn on a hub download, and say
    nothing when the weights come from a local file: the tag's pretrained config decides, on both.
    """
    if not tag or arch.startswith(("hf-hub:", "local-dir:")):
        return False
    return bool((open_clip.get_pretrained_cfg(arch, tag) or {}).get("quick_gelu"))


def _load_open_clip(arch: str, tag, weights: str | None, image_size: int | None,
                    preprocess: dict[str, Any]) -> Backbone:
    import open_clip

    if not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
        raise VisaeError(f"unknown open_clip architecture {arch!r}" + _close_matches(arch, open_clip.list_models()))
    if tag is not None and not isinstance(tag, str):
        raise VisaeError(f"pretrained for open_clip {arch} must be a tag name (e.g. openai), got {tag!r}")
    if tag and not arch.startswith(("hf-hub:", "local-dir:")):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            raise VisaeError(
                f"unknown pretrained tag {tag!r} for open_clip {arch}: known tags are {', '.join(tags) or 'none'}"
            )
    kwargs: dict[str, Any] = {"force_image_size": image_size} if image_size else {}
    if not arch.startswith(("hf-hub:", "local-dir:")):
        kwargs.update({k: v for k, v in _open_clip_preprocess_cfg(open_clip, arch, tag).items() if v is not None})
    if preprocess["interpolation"] is not None:
        kwargs["image_interpolation"] = preprocess["interpolation"]
    if open_clip_quick_gelu(open_clip, arch, tag):
        kwargs["force_quick_gelu"] = True
    download = bool(tag) and weights is None
    try:
        with _quiet_open_clip(), _hub_access() if download else contextlib.nullcontext():
            clip, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=tag if download else None, **kwargs
            )
    except RuntimeError as err:
        if download:
            raise VisaeError(_no_download_msg("open_clip", arch, tag)) from err
        raise VisaeError(f"open_clip {arch} cannot be built: {_summarise_load_error(err)}") from err
    if weights is not None:
        _load_open_clip_weights(open_clip, clip, weights, arch)
    visual = clip.visual
    del clip  # drop the text tower: only the image side is recorded
    return _wrap_open_clip_visual(visual, preprocess, arch, tag, weights)


class _DropOpenClipRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}open_clip{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs to the root logger ("initialized randomly", "failed to download"); visae
    reports those conditions itself, as one line."""
    root, flt = logging.getLogger(), _DropOpenClipRecords()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _load_open_clip_weights(open_clip, clip: torch.nn.Module, path: str, arch: str) -> None:
    """Full CLIP checkpoints go through open_clip's loader (format conversions, pos-embed resize);
    a visual-tower-only state dict (keys without `visual.`) loads into the visual tower."""
    from open_clip.factory import load_state_dict

    try:
        if Path(path).suffix in (".npz", ".npy"):
            open_clip.load_checkpoint(clip, path)
            return
        sd = load_state_dict(path)
    except Exception as err:
        raise VisaeError(f"cannot read weights file {path}: {_summarise_load_error(err)}") from err
    try:
        if any(k.startswith("visual.") for k in sd):
            del sd
            open_clip.load_checkpoint(clip, path, strict=True)
        else:
            clip.visual.load_state_dict(sd, strict=True)
    except Exception as err:
        raise VisaeError(_mismatch_msg(path, "open_clip", arch, err)) from err


def _wrap_open_clip_visual(visual, preprocess, arch: str, tag, weights) -> Backbone:
    from open_clip.timm_model import TimmModel

    if isinstance(visual, TimmModel):  # SigLIP & co: a timm ViT trunk inside open_clip
        trunk = visual.trunk
        parts = _timm_vit_parts(trunk, f"open_clip {arch}")
        return Backbone(
            name=arch, source="open_clip", arch=arch, model=visual, transform=preprocess,
            blocks=trunk.blocks, run=trunk.forward_features, batch_first=True,
            pretrained=tag, weights=weights, final_norm=trunk.norm, **parts,
        )
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks") or not hasattr(visual, "grid_size"):
        raise VisaeError(
            f"open_clip {arch} has no ViT image tower ({type(visual).__name__}): visae records ViTs only"
        )
    # open_clip >= 2.2x runs blocks batch-first; older versions run them sequence-first.
    batch_first = getattr(transformer, "batch_first", False)
    layout = TokenLayout(n_cls=1, n_registers=0, grid=tuple(visual.grid_size))
    return Backbone(
        name=arch, source="open_clip", arch=arch, model=visual, transform=preprocess,
        image_size=tuple(visual.image_size), patch_size=tuple(visual.patch_size),
        d_model=transformer.width, layout=layout, blocks=transformer.resblocks, run=visual,
        batch_first=batch_first, pretrained=tag, weights=weights, final_norm=visual.ln_post,
    )


# --------------------------------------------------------------------------- timm

def _timm_vit_parts(model: torch.nn.Module, what: str) -> dict[str, Any]:
    """Token layout and geometry of a timm ViT, read off the model itself."""
    pe = getattr(model, "patch_embed", None)
    if not isinstance(getattr(model, "blocks", None), torch.nn.Sequential | torch.nn.ModuleList) or \
            pe is None or getattr(pe, "grid_size", None) is None or not hasattr(model, "num_prefix_tokens"):
        raise VisaeError(
            f"{what} is not a plain ViT (needs .blocks, .patch_embed.grid_size, .num_prefix_tokens): "
            f"visae records ViT residual streams only"
        )
    n_cls = 1 if getattr(model, "cls_token", None) is not None else 0
    # Registers, plus any other prefix token (e.g. DeiT's distillation token), sit between CLS and patches.
    n_reg = int(model.num_prefix_tokens) - n_cls
    return {
        "image_size": tuple(pe.img_size),
        "patch_size": tuple(pe.patch_size),
        "d_model": int(getattr(model, "embed_dim", None) or model.num_features),
        "layout": TokenLayout(n_cls=n_cls, n_registers=n_reg, grid=tuple(pe.grid_size)),
    }


def _load_timm(source: str, arch: str, tag, weights: str | None, image_size: int | None,
               model_kwargs: dict[str, Any], preprocess: dict[str, Any]) -> Backbone:
    import timm

    base, _, arch_tag = arch.partition(".")
    if not timm.is_model(base):
        raise VisaeError(f"unknown timm architecture {base!r}" + _close_matches(base, timm.list_models()))
    # The arch's own tag only selects timm's config (input size, mean/std); `pretrained` asks for
    # the hub weights. `pretrained: true` means the arch's tag, or timm's default one.
    if tag is True:
        tag = arch_tag or _timm_default_tag(timm, base)
    elif tag is False:
        tag = None
    if tag is not None and not isinstance(tag, str):
        raise VisaeError(f"pretrained for timm {arch} must be a tag name (e.g. lvd142m), got {tag!r}")
    if tag and arch_tag and tag != arch_tag:
        raise VisaeError(f"timm {arch} names tag {arch_tag!r} but pretrained: is {tag!r}; give one")
    spec_tag = tag or None
    download = bool(spec_tag) and weights is None
    tag = tag or arch_tag or None
    full = f"{base}.{tag}" if tag else base
    if tag:
        known = timm.list_pretrained(f"{base}.*")
        if full not in known:
            tags = [k.split(".", 1)[1] for k in known]
            raise VisaeError(f"unknown pretrained tag {tag!r} for timm {base}: known tags are "
                             f"{', '.join(tags) or 'none'}")
    kwargs = dict(model_kwargs)
    if image_size:
        kwargs["img_size"] = image_size
    try:
        if download:
            with _hub_access():
                model = timm.create_model(full, pretrained=True, **kwargs)
        else:
            model = timm.create_model(full, pretrained=False, **kwargs)
    except VisaeError:
        raise
    except TypeError as err:
        raise VisaeError(f"timm {full} does not accept {sorted(kwargs)}: {_summarise_load_error(err)}") from err
    except Exception as err:
        if download:
            raise VisaeError(_no_download_msg(source, full, tag)) from err
        raise VisaeError(f"timm {full} cannot be built with model_kwargs {kwargs}: {_summarise_load_error(err)}") from err
    parts = _timm_vit_parts(model, f"timm {full}")
    if weights is not None:
        _load_timm_weights(model, weights, source, full)
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = (cfg["input_size"][0], *parts["image_size"])  # honour img_size overrides
    cfg.update({k: v for k, v in preprocess.items() if v is not None})
    transform = timm.data.create_transform(**cfg, is_training=False)
    return Backbone(
        name=arch, source=source, arch=full, model=model, transform=transform,
        blocks=model.blocks, run=model.forward_features, batch_first=True,
        pretrained=spec_tag, weights=weights, final_norm=model.norm, **parts,
    )


def _timm_default_tag(timm, base: str) -> str:
    known = timm.list_pretrained(f"{base}.*")
    if not known:
        raise VisaeError(f"timm {base} has no pretrained weights to download")
    return known[0].split(".", 1)[1]


def _load_timm_weights(model: torch.nn.Module, path: str, source: str, arch: str) -> None:
    """Load a local state dict strictly, through the model family's own checkpoint filter
    (converts original-format checkpoints, resamples position embeddings to img_size)."""
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(path, use_ema=True)
    except Exception as err:
        raise VisaeError(f"cannot read weights file {path}: {_summarise_load_error(err)}") from err
    try:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            sd = filter_fn(sd, model)
        model.load_state_dict(sd, strict=True)
    except Exception as err:
        raise VisaeError(_mismatch_msg(path, source, arch, err)) from err

"""SAE checkpoints: `sae.safetensors` (weights + normalisation buffers) and `config.json`
(architecture, hyperparameters, normalisation constants, data provenance, tokens seen, code
version). Both are written atomically, the config last, so a directory with a config.json is
a complete checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from visae.atomic import atomic_path, write_json
from visae.errors import VisaeError
from visae.sae.config import ARCHITECTURES
from visae.store.meta import model_identity
from visae.sae.modules import SAE, build_sae

WEIGHTS, CONFIG = "sae.safetensors", "config.json"


def save(sae: SAE, directory: str | Path, config: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sae.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"architecture": sae.architecture})
    full = {**config, "architecture": sae.architecture, "d_model": sae.d_model, "width": sae.width,
            "hparams": sae.hparams,
            "normalisation": {"mu_in_weights": "mu", "scale": float(sae.scale)}}
    write_json(directory / CONFIG, full)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    directory = path.parent if path.is_file() else path
    cfg_path = directory / CONFIG
    if not cfg_path.is_file():
        partial = directory / "checkpoint" / CONFIG
        if partial.is_file():
            try:
                info = json.loads(partial.read_text())
            except ValueError:
                info = {}  # a corrupt last checkpoint: still an SAE that did not finish
            raise VisaeError(f"SAE {directory.name!r} did not finish ({info.get('status', 'interrupted')}"
                             f"{': ' + info['failure'] if info.get('failure') else ''}); its last good "
                             f"checkpoint is {directory / 'checkpoint'}")
        raise VisaeError(f"{directory} is not an SAE checkpoint (no {CONFIG})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as err:
        raise VisaeError(f"{cfg_path} is corrupt ({err})") from None
    if not isinstance(cfg, dict):
        raise VisaeError(f"{cfg_path} is corrupt (a JSON {type(cfg).__name__}, not an object)")
    if cfg.get("architecture") not in ARCHITECTURES:
        raise VisaeError(f"{cfg_path} is corrupt (architecture {cfg.get('architecture')!r}; "
                         f"allowed: {', '.join(ARCHITECTURES)})")
    for key in ("d_model", "width"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise VisaeError(f"{cfg_path} is corrupt ({key} {cfg.get(key)!r} is not a positive integer)")
    return cfg


def load(path: str | Path, device: str = "cpu") -> SAE:
    """A ready module in eval mode; its `encode`/`decode` take RAW activations."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    cfg = read_config(directory)
    if not (directory / WEIGHTS).is_file():
        raise VisaeError(f"{directory / WEIGHTS} is missing")
    sae = build_sae(cfg["architecture"], cfg["d_model"], cfg["width"], seed=0, **cfg.get("hparams", {}))
    try:
        state = load_file(str(directory / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types
        raise VisaeError(f"{directory / WEIGHTS} is corrupt ({err})") from None
    missing = set(sae.state_dict()) - set(state)
    if missing:
        raise VisaeError(f"{directory / WEIGHTS} lacks tensors {sorted(missing)}")
    try:
        sae.load_state_dict(state)
    except RuntimeError as err:  # shapes that do not fit the config
        raise VisaeError(f"{directory / WEIGHTS} does not fit its {CONFIG} "
                         f"({str(err).strip().splitlines()[-1].strip()})") from None
    sae.config = cfg
    return sae.to(device).eval()


def check_compatible(cfg_or_sae, store) -> None:
    """Refuse an SAE whose d_model does not match the store's activations."""
    cfg = getattr(cfg_or_sae, "config", cfg_or_sae)
    d = int(cfg["d_model"])
    if d != store.d_model:
        raise VisaeError(f"SAE {cfg.get('name', '?')!r} was trained on d_model={d} but store {store.root} "
                         f"has d_model={store.d_model} (model {store.info.model or '?'}, "
                         f"layer {store.info.layer})")


def source_mismatch(cfg_or_sae, store, allow: bool = False) -> str | None:
    """Refuse an SAE trained on another model or layer than the store holds (one line naming
    both); with `allow`, return that line instead, for the caller's outputs to carry. None when
    they match. The model is compared by its recorded identity (what made the activations: not
    the weights' path or the config's name), or as a whole where a store records none."""
    cfg = getattr(cfg_or_sae, "config", cfg_or_sae)
    src = cfg.get("source", {})
    ours = {"model": _model_identity(src.get("model")), "layer": src.get("layer")}
    theirs = {"model": _model_identity(store.info.model), "layer": store.info.layer}
    if json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True):
        return None
    what = " and ".join(k for k in ("model", "layer") if json.dumps(ours[k], sort_keys=True)
                        != json.dumps(theirs[k], sort_keys=True))
    line = (f"SAE {cfg.get('name', '?')!r} was trained on another {what} than store {store.root} holds "
            f"(SAE: {_short(ours)}; store: {_short(theirs)})")
    if not allow:
        raise VisaeError(f"{line}: pass --allow-mismatch to use it anyway")
    return line


def _model_identity(model):
    """The model's recorded identity, or the model as recorded where a store has none."""
    return model_identity(model) or model


def _short(source: dict) -> str:
    model = source["model"]
    if isinstance(model, dict):  # a model identity: name it by its most telling fields
        model = " ".join(str(model[k]) for k in ("source", "arch", "tag", "weights_sha256") if model.get(k))
    return f"model {model}, layer {source['layer']}"


@torch.no_grad()
def state_to_cpu(state: dict) -> dict:
    return {k: (v.detach().to("cpu").clone() if torch.is_tensor(v) else v) for k, v in state.items()}

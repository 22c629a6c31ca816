"""`visae sae export` and `visae sae import`: SAE checkpoints that travel.

Every mapping below is exact in real arithmetic; in float32 a fold rounds each weight once
(~1e-7 relative), so codes and reconstructions agree to ~1e-6, not bit for bit.

export (visae -> SAELens 6.x, `cfg.json` + `sae_weights.safetensors`, what
`sae_lens.SAE.load_from_disk` reads). SAELens's inference SAEs take raw activations and apply no
stored constants (its `normalize_activations` options are per-token, or folded into the weights
after training), so visae's normalisation x_n = (x - mu) / scale is folded into the weights:
W_enc' = W_enc / scale, W_dec' = scale * W_dec, b_dec' = mu + scale * b_dec, b_enc' = b_enc.
The pre-activations do not change, so neither do the codes nor any threshold. Architectures:
relu -> standard; topk and matryoshka over top-k -> topk (rescale_acts_by_decoder_norm false);
jumprelu -> jumprelu; batchtopk and matryoshka over batch top-k -> jumprelu with their one
inference threshold on every latent (what SAELens itself saves a BatchTopK SAE as). The visae
config (architecture, hyperparameters, mu, scale, provenance) rides in `metadata.visae`, so an
import of the folder restores the visae SAE (architecture, hyperparameters and unit-norm decoder).

import (SAELens, saev -> a visae checkpoint whose `encode`/`decode` on RAW activations give the
source's codes and reconstructions). SAELens: standard -> relu, topk -> topk (a decoder-norm
rescale is folded into the weights), jumprelu -> jumprelu (thresholds below 0 are 0: SAELens
applies a ReLU first, so that is exact); apply_b_dec_to_input false is folded into b_enc.
saev (a JSON header line, then a torch state dict): files without a schema (saev <= 0.1, the
paper's published SAEs) are ReLU SAEs on activations that saev's data loader normalised, with
constants it recomputes from the data (mean, and E||x - mean|| / sqrt(d), over the first 2^19
tokens of a permutation seeded 42): the import applies that recipe to `--store`, or takes
`--mean`/`--scale`. Schemas 2-5 (saev since mid 2025) encode x W_enc + b_enc without subtracting
b_dec (folded into b_enc) on raw activations; ReLU and BatchTopK (its inference threshold) map,
TopK does not (it keeps negative values, visae's applies a ReLU), nor does schema 1 (saev
changed its encoder under that schema number).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from visae.args import nonneg_int, open_fraction, positive_float
from visae.atomic import atomic_path, clean_stale_temps, write_json
from visae.errors import VisaeError
from visae.provenance import git_state, provenance
from visae.sae import checkpoint as ckpt
from visae.sae.config import IMPORT_FORMATS, validate_grid
from visae.sae.split import SPLIT_METHOD, split_record
from visae.store.format import sha256_file

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SAELENS_FORMAT = "6.54.12"  # the SAELens release whose format export writes and the tests load with
VISAE_BLOCK = "visae"  # the key in SAELens's metadata that carries the visae checkpoint's description
SAEV_NORM_TOKENS, SAEV_NORM_SEED = 2 ** 19, 42  # saev's DataLoad.n_random_samples and its permutation seed
NORMALISATIONS = ("auto", "saev", "none")


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


# -- export ----------------------------------------------------------------------------------
def saelens_architecture(architecture: str, hparams: dict) -> str:
    """The SAELens inference architecture that computes a visae architecture's codes."""
    if architecture == "relu":
        return "standard"
    if architecture == "topk" or (architecture == "matryoshka" and hparams.get("inner", "batchtopk") == "topk"):
        return "topk"
    return "jumprelu"  # jumprelu; batchtopk and matryoshka over batch top-k: one threshold at inference


def to_saelens(sae) -> tuple[dict, dict]:
    """(cfg.json, tensors) of a loaded visae SAE in SAELens's inference format, normalisation folded."""
    cfg = getattr(sae, "config", {})
    name, arch, h = cfg.get("name", "?"), sae.architecture, sae.width
    s, mu = float(sae.scale), _float64(sae.mu)
    lens = saelens_architecture(arch, sae.hparams)
    tensors = {"W_enc": _float64(sae.W_enc) / s, "b_enc": _float64(sae.b_enc),
               "W_dec": _float64(sae.W_dec) * s, "b_dec": mu + s * _float64(sae.b_dec)}
    lens_cfg = {"architecture": lens, "d_in": sae.d_model, "d_sae": h, "dtype": "float32", "device": "cpu",
                "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none"}
    block = {"format": "visae-sae/1", "architecture": arch, "hparams": sae.hparams,
             "mu": [float(v) for v in sae.mu.detach().cpu().tolist()], "scale": s, "config": cfg}
    if lens == "topk":
        lens_cfg.update(k=int(sae.k), rescale_acts_by_decoder_norm=False)
    elif lens == "jumprelu":
        if arch == "jumprelu":
            theta = _float64(sae.theta)
            if bool((theta < 0).any()):  # visae keeps f = pre in (θ, 0]; SAELens's ReLU would zero it
                raise VisaeError(f"SAE {name!r} has negative JumpReLU thresholds: SAELens applies a ReLU first, "
                                 f"so it cannot represent them")
            tensors["threshold"] = theta
        else:
            t = float(sae.threshold)
            if t < 0:
                raise VisaeError(f"SAE {name!r} ({arch}) has no inference threshold yet (it never took a training "
                                 f"step): its codes are a top-k over the batch, which SAELens cannot represent")
            tensors["threshold"] = torch.full((h,), t, dtype=torch.float64)
            block["threshold"] = t
    identity = cfg.get("identity") or {}
    layer = identity.get("layer")
    lens_cfg["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": None,
        "model_name": identity.get("model"), "dataset_path": identity.get("dataset"),
        "hook_name": f"blocks.{layer}.hook_resid_post" if isinstance(layer, int) else None,
        "exported_by": f"visae {_version()}", VISAE_BLOCK: block}
    return lens_cfg, {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}


def export_saelens(sae_dir, out) -> Path:
    """Write the visae checkpoint at `sae_dir` as a SAELens folder `out`; cfg.json last."""
    from safetensors.torch import save_file

    sae = ckpt.load(sae_dir)
    cfg, tensors = to_saelens(sae)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    (out / SAELENS_CFG).unlink(missing_ok=True)  # a kill from here on leaves no folder that looks whole
    with atomic_path(out / SAELENS_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    write_json(out / SAELENS_CFG, cfg)
    return out


# -- what an import reads --------------------------------------------------------------------
@dataclass
class Source:
    """An SAE read from elsewhere, in visae's terms (float64 tensors): its codes are
    act(((x - mu) / scale - b_dec) W_enc + b_enc) and its reconstruction (f W_dec + b_dec) scale + mu.
    `mu` None: the constants are the import's to choose (saev <= 0.1 normalised in its data loader)."""
    format: str
    architecture: str
    hparams: dict
    tensors: dict  # W_enc [d, h], b_enc [h], W_dec [h, d], b_dec [d]; theta [h] (jumprelu) or threshold []
    mu: torch.Tensor | None
    scale: float
    normalised_by_source: bool  # whether the source expects activations normalised outside the SAE
    info: dict = field(default_factory=dict)  # what the source says about itself (recorded under `imported`)
    config: dict | None = None  # the visae config an exported SAELens folder carries
    entry: dict = field(default_factory=dict)  # hyperparameters the tables show (k, l1)

    @property
    def d_model(self) -> int:
        return int(self.tensors["W_enc"].shape[0])

    @property
    def width(self) -> int:
        return int(self.tensors["W_enc"].shape[1])


def _check_shapes(where: str, t: dict, d: int | None = None, h: int | None = None) -> None:
    d = t["W_enc"].shape[0] if d is None else d
    h = t["W_enc"].shape[1] if h is None else h
    want = {"W_enc": (d, h), "b_enc": (h,), "W_dec": (h, d), "b_dec": (d,), "theta": (h,), "threshold": ()}
    for k, v in t.items():
        if tuple(v.shape) != want[k]:
            raise VisaeError(f"{where}: tensor {k} has shape {tuple(v.shape)}, expected {want[k]} "
                             f"(d_model {d}, width {h})")


def _major(version) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


SAELENS_ARCHITECTURES = ("standard", "topk", "jumprelu")


def read_saelens(path) -> Source:
    """A SAELens folder (cfg.json + sae_weights.safetensors, inference format)."""
    from safetensors import safe_open

    path = Path(path)
    cfg_path, w_path = path / SAELENS_CFG, path / SAELENS_WEIGHTS
    if not (cfg_path.is_file() and w_path.is_file()):
        raise VisaeError(f"{path} is not a SAELens SAE folder (it needs {SAELENS_CFG} and {SAELENS_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as err:
        raise VisaeError(f"{cfg_path} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise VisaeError(f"{cfg_path} is not a SAELens config (a JSON {type(cfg).__name__})")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    arch = cfg.get("architecture") or "standard"  # SAELens < 6 wrote none for its standard SAE
    hparams = {}
    if _major(version) < 6:  # SAELens's own pre-6 defaults (loading/pretrained_sae_loaders.handle_pre_6_0_config)
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        if fn == "topk":
            arch, hparams["k"] = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k")
        elif fn != "relu":
            raise VisaeError(f"{cfg_path}: activation_fn {fn!r} has no visae architecture (relu and topk do)")
    if arch not in SAELENS_ARCHITECTURES:
        hint = (": it is SAELens's training format; save the inference SAE (save_inference_model) and import that"
                if arch in ("batchtopk", "matryoshka_batchtopk") else "")
        raise VisaeError(f"{cfg_path}: SAELens architecture {arch!r} has no visae equivalent "
                         f"(standard, topk and jumprelu do){hint}")
    norm = cfg.get("normalize_activations", "none")
    if norm in ("layer_norm", "constant_norm_rescale"):
        raise VisaeError(f"{cfg_path}: normalize_activations {norm!r} rescales each token at run time, "
                         f"which visae's fixed normalisation cannot represent")
    if norm not in ("none", "expected_average_only_in", "covariance_whitening", None):
        raise VisaeError(f"{cfg_path}: unknown normalize_activations {norm!r}")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise VisaeError(f"{cfg_path}: reshape_activations {cfg['reshape_activations']!r} (attention heads) "
                         f"does not apply to a residual-stream store")
    if cfg.get("finetuning_scaling_factor"):
        raise VisaeError(f"{cfg_path}: finetuning_scaling_factor has no visae equivalent")
    try:
        with safe_open(str(w_path), framework="pt") as fh:
            raw = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise VisaeError(f"{w_path} is corrupt ({err})") from None
    if "log_threshold" in raw:  # older JumpReLU checkpoints (SAELens converts them the same way)
        raw["threshold"] = raw.pop("log_threshold").double().exp()
    scaling = raw.pop("scaling_factor", None)
    if scaling is not None and not bool((scaling == 1).all()):
        raise VisaeError(f"{w_path}: a scaling_factor other than 1 has no visae equivalent")
    need = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    if set(raw) != need:
        missing, extra = sorted(need - set(raw)), sorted(set(raw) - need)
        raise VisaeError(f"{w_path} does not hold a SAELens {arch} SAE"
                         + (f" (missing {', '.join(missing)})" if missing else "")
                         + (f" (unexpected {', '.join(extra)})" if extra else ""))
    t = {k: _float64(v) for k, v in raw.items()}
    _check_shapes(str(w_path), {k: v for k, v in t.items() if k != "threshold"} | (
        {"theta": t["threshold"]} if "threshold" in t else {}), cfg.get("d_in"), cfg.get("d_sae"))
    info = {"sae_lens_version": version, "architecture": arch, "dtype": str(cfg.get("dtype")),
            "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True), "normalize_activations": norm,
            "hook_name": meta.get("hook_name"), "model_name": meta.get("model_name")}
    restored = _restore_visae(cfg, meta.get(VISAE_BLOCK), arch, t)
    if restored is not None:
        restored.info = {**info, **restored.info}
        return restored
    if arch == "topk":
        hparams["k"] = int(cfg.get("k", hparams.get("k") or 0) or 0)
        if hparams["k"] < 1:
            raise VisaeError(f"{cfg_path}: a topk SAE without k")
        info["rescale_acts_by_decoder_norm"] = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if not cfg.get("apply_b_dec_to_input", True):  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if arch == "topk" and info["rescale_acts_by_decoder_norm"]:
        # SAELens selects on pre · ||W_dec row|| and decodes f / ||W_dec row||: fold both
        norms = t["W_dec"].norm(dim=1)
        if bool((norms == 0).any()):
            raise VisaeError(f"{w_path}: a decoder row of zero norm cannot be folded (rescale_acts_by_decoder_norm)")
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    visae_arch = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    if arch == "jumprelu":
        t["theta"] = t.pop("threshold").clamp_min(0)  # relu(pre)·1[pre > θ] = pre·1[pre > max(θ, 0)]
    d = t["W_enc"].shape[0]
    return Source("saelens", visae_arch, hparams, t, torch.zeros(d, dtype=torch.float64), 1.0, False, info,
                  entry={"architecture": visae_arch, **({"k": hparams["k"]} if "k" in hparams else {})})


def _restore_visae(cfg: dict, block, arch: str, t: dict):
    """The visae SAE an export wrote (its architecture, hyperparameters and normalisation, the fold
    undone), when the folder still is what the export wrote; else None (imported as SAELens)."""
    if not isinstance(block, dict) or block.get("format") != "visae-sae/1":
        return None
    v_arch, hparams = block.get("architecture"), block.get("hparams") or {}
    if (v_arch not in ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
            or saelens_architecture(v_arch, hparams) != arch or not cfg.get("apply_b_dec_to_input", True)
            or cfg.get("rescale_acts_by_decoder_norm") or cfg.get("normalize_activations", "none") != "none"
            or (arch == "topk" and cfg.get("k") != hparams.get("k"))):
        return None
    d = t["W_enc"].shape[0]
    mu = torch.tensor(block.get("mu") or [0.0] * d, dtype=torch.float64)
    s = float(block.get("scale", 1.0))
    if mu.shape != (d,) or not s > 0:
        return None
    out = {"W_enc": t["W_enc"] * s, "b_enc": t["b_enc"], "W_dec": t["W_dec"] / s, "b_dec": (t["b_dec"] - mu) / s}
    if v_arch == "jumprelu":
        out["theta"] = t["threshold"]
    elif arch == "jumprelu":  # batchtopk / matryoshka: one threshold, the same on every latent
        thr = t["threshold"]
        if not bool((thr == thr[0]).all()):
            return None
        out["threshold"] = thr[0].clone()
    config = block.get("config") if isinstance(block.get("config"), dict) else None
    return Source("saelens", v_arch, dict(hparams), out, mu, s, False, {"restored": "visae"}, config=config,
                  entry=dict((config or {}).get("entry") or {}))


def read_saev(path) -> Source:
    """A saev checkpoint: one JSON header line, then `torch.save` of the state dict."""
    path = Path(path)
    if not path.is_file():
        raise VisaeError(f"saev checkpoint {path} is not a file")
    raw = path.read_bytes()
    line, _, rest = raw.partition(b"\n")
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise VisaeError(f"{path} is not a saev checkpoint (its first line is not a JSON header)")
    try:
        state = torch.load(io.BytesIO(rest), weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises many types on a truncated or foreign file
        raise VisaeError(f"{path}: the state dict after the header is unreadable ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise VisaeError(f"{path}: no state dict after the header")
    schema = header.get("schema")
    info = {"schema": schema, "commit": header.get("commit"), "lib": header.get("lib"), "header": header}
    entry = {}
    if schema is None:  # saev <= 0.1 (the paper's SAEs): ReLU on (x_n - b_dec), x_n from saev's data loader
        arch, hparams, subtract_b_dec, normalised = "relu", {}, True, True
        if header.get("sparsity_coeff") is not None:
            entry["l1"] = header["sparsity_coeff"]
    elif schema == 1:
        raise VisaeError(f"{path}: saev schema 1 is ambiguous (saev dropped the b_dec subtraction from its encoder "
                         f"within schema 1): load it with the saev version that wrote it and dump it again")
    elif schema in (2, 3, 4, 5):
        activation = (header.get("cfg") or {}).get("activation") or {}
        cls, params = activation.get("cls"), activation.get("params") or {}
        subtract_b_dec, normalised = False, False  # saev >= 0.2: h = x W_enc + b_enc, raw activations
        if cls == "Relu":
            arch, hparams = "relu", {}
            sparsity = params.get("sparsity") or {}  # {"cls": "L1Sparsity", "params": {...}} or, before, {...}
            coeff = sparsity.get("params", sparsity).get("coeff")
            if coeff is not None:
                entry["l1"] = coeff
        elif cls == "BatchTopK":
            if "activation.threshold" not in state:
                raise VisaeError(f"{path}: this saev BatchTopK SAE has no inference threshold (saev before 2025-11 "
                                 f"applied the batch top-k at inference too), which visae cannot represent")
            arch, hparams = "batchtopk", {"k": int(params.get("top_k", 0))}
            entry["k"] = hparams["k"]
        elif cls == "TopK":
            raise VisaeError(f"{path}: saev's TopK keeps negative pre-activations among the top k (no ReLU); "
                             f"visae's TopK applies a ReLU, so it cannot represent it")
        else:
            raise VisaeError(f"{path}: saev activation {cls!r} has no visae equivalent (Relu and BatchTopK do)")
    else:
        raise VisaeError(f"{path}: unknown saev schema {schema!r} (visae reads none, 2, 3, 4 and 5)")
    need = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"activation.threshold"} if arch == "batchtopk" else set())
    if not need <= set(state):
        raise VisaeError(f"{path}: the state dict lacks {', '.join(sorted(need - set(state)))}")
    t = {k: _float64(state[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    _check_shapes(str(path), t)
    if not subtract_b_dec:  # x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if arch == "batchtopk":
        # saev at inference: x if x > θ else 0, and a ReLU while θ <= 0: pre·1[pre > max(θ, 0)]
        t["threshold"] = _float64(state["activation.threshold"]).reshape(()).clamp_min(0)
    return Source("saev", arch, hparams, t, None, 1.0, normalised, info, entry={"architecture": arch, **entry})


# -- normalisation ---------------------------------------------------------------------------
def _gather_rows(store, rows: np.ndarray) -> torch.Tensor:
    """The tokens at flat store rows `rows` ([images * tokens_per_image] numbering), float64."""
    per = store.tokens_per_image
    starts = np.array([s["start"] * per for s in store.info.shards] + [store.n_tokens])
    shard_of = np.searchsorted(starts, rows, side="right") - 1
    out = torch.empty((len(rows), store.d_model), dtype=store.shard_tensors[0].dtype)
    for s in np.unique(shard_of):
        at = np.flatnonzero(shard_of == s)
        out[torch.from_numpy(at)] = torch.index_select(store.shard_tensors[s], 0, torch.from_numpy(rows[at] - starts[s]))
    data = out.view(torch.bfloat16) if store.dtype_name == "bfloat16" else out
    return data.to(torch.float64)


def saev_normalisation(store, token_kind: str | None, n: int = SAEV_NORM_TOKENS, seed: int = SAEV_NORM_SEED,
                       chunk: int = 1 << 16) -> tuple[torch.Tensor, float]:
    """saev's constants on a store (its `activations.Dataset`): the first `n` of a permutation seeded
    42 over every token of the kind (image by image, as saev numbers them), mu their mean and
    scale = E||x - mu|| / sqrt(d), accumulated in float64 (saev: float32)."""
    idx = store.token_index(token_kind)
    per = len(idx)
    pick = np.random.default_rng(seed=seed).permutation(store.n_images * per)[:n]
    rows = np.sort((pick // per) * store.tokens_per_image + idx[pick % per])
    total = torch.zeros(store.d_model, dtype=torch.float64)
    for lo in range(0, len(rows), chunk):
        total += _gather_rows(store, rows[lo:lo + chunk]).sum(0)
    mu = total / len(rows)
    norms = sum(float((_gather_rows(store, rows[lo:lo + chunk]) - mu).norm(dim=1).sum())
                for lo in range(0, len(rows), chunk))
    return mu, norms / len(rows) / math.sqrt(store.d_model)


def _read_mean(path: str, d: int) -> torch.Tensor:
    """A mean vector from a file: torch.save'd (saev's `scale_mean` path) or .npy."""
    p = Path(path)
    if not p.is_file():
        raise VisaeError(f"--mean {path} is not a file")
    try:
        value = np.load(p) if p.suffix == ".npy" else torch.load(p, weights_only=True, map_location="cpu")
    except Exception as err:  # numpy / torch raise many types on a foreign file
        raise VisaeError(f"--mean {path} is unreadable ({str(err).splitlines()[0]})") from None
    mean = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if mean.shape != (d,):
        raise VisaeError(f"--mean {path} has {mean.numel()} values, the SAE's d_model is {d}")
    return mean


# -- import ----------------------------------------------------------------------------------
def build_module(src: Source):
    """The visae SAE module computing `src`'s codes and reconstructions."""
    from visae.sae.modules import build_sae

    sae = build_sae(src.architecture, src.d_model, src.width, seed=0, **src.hparams)
    state = sae.state_dict()
    for k, v in src.tensors.items():
        state[k] = v.to(state[k].dtype).reshape(state[k].shape)
    state["mu"] = src.mu.to(torch.float32)
    state["scale"] = torch.tensor(float(src.scale), dtype=torch.float32)
    sae.load_state_dict(state)
    return sae.eval()


def import_sae(fmt: str, path, out, *, name: str | None = None, sha256: str | None = None, store_path=None,
               model=None, dataset=None, layer=None, heldout: float = 0.1, split_seed: int = 0,
               token_kind: str | None = None, normalisation: str = "auto", mean: str | None = None,
               scale: float | None = None, marker=None) -> dict:
    """Read `path` (format `fmt`), check it (sha256, the store's d_model), and write the visae
    checkpoint `out` (then `marker`, last). Returns the checkpoint's config."""
    started = time.time()
    if fmt not in IMPORT_FORMATS:
        raise VisaeError(f"unknown import format {fmt!r}; allowed: {', '.join(IMPORT_FORMATS)}")
    if normalisation not in NORMALISATIONS:
        raise VisaeError(f"unknown normalisation {normalisation!r}; allowed: {', '.join(NORMALISATIONS)}")
    if fmt == "saelens" and (mean is not None or scale is not None or normalisation == "saev"):
        raise VisaeError("a SAELens SAE takes raw activations: --normalisation saev and --mean/--scale apply "
                         "to saev checkpoints")
    if (mean is None) != (scale is None):
        raise VisaeError("give --mean and --scale together (saev's scale_mean and scale_norm constants)")
    path = Path(path)
    main_file = path / SAELENS_WEIGHTS if fmt == "saelens" else path
    if not main_file.is_file():
        what = "a SAELens SAE folder" if fmt == "saelens" else "a saev checkpoint file"
        raise VisaeError(f"{path} is not {what}")
    files = {main_file.name: sha256_file(main_file)}
    if fmt == "saelens" and (path / SAELENS_CFG).is_file():
        files[SAELENS_CFG] = sha256_file(path / SAELENS_CFG)
    if sha256 and files[main_file.name] != sha256:
        raise VisaeError(f"{main_file} has sha256 {files[main_file.name]}, not the {sha256} the entry expects")
    src = read_saelens(path) if fmt == "saelens" else read_saev(path)
    name = name or (src.config or {}).get("name") or (path.stem if fmt == "saev" else path.resolve().name)
    validate_grid([{"name": name, "import": fmt, "path": str(path), **({"sha256": sha256} if sha256 else {})}],
                  1, allow_import=True)
    store = None
    if store_path is not None:
        if any(v is not None for v in (model, dataset, layer)):
            raise VisaeError("give --store or --model/--dataset/--layer, not both (a store names its own)")
        from visae.store import ActivationStore

        store = ActivationStore(store_path, verify=True)  # re-hash: never import against a tampered store
        if store.d_model != src.d_model:
            raise VisaeError(f"{main_file} is an SAE of d_model {src.d_model} but store {store.root} has d_model "
                             f"{store.d_model} (model {_model_name(store.info.model)}, layer {store.info.layer})")
        store.token_index(token_kind)  # a kind the store lacks fails here, before anything is written

    # the normalisation constants: a SAELens SAE's are its own (raw activations, or what an export
    # folded); a saev checkpoint's are saev's recipe on the store, given ones, or none
    if fmt == "saelens":
        norm_record = {"method": "restored" if src.config is not None else "none"}
    elif mean is not None:
        src.mu, src.scale = _read_mean(mean, src.d_model), float(scale)
        norm_record = {"method": "given", "mean": str(mean), "scale": float(scale)}
    elif normalisation == "saev" or (normalisation == "auto" and src.normalised_by_source):
        if store is None:
            raise VisaeError(f"{path}: saev <= 0.1 checkpoints expect activations normalised by saev's data loader, "
                             f"which recomputes its constants from the data: give --store (saev's recipe on it), "
                             f"--mean and --scale, or --normalisation none")
        src.mu, src.scale = saev_normalisation(store, token_kind)
        n = min(SAEV_NORM_TOKENS, store.n_images * len(store.token_index(token_kind)))
        norm_record = {"method": "saev", "tokens": n, "seed": SAEV_NORM_SEED, "token_kind": token_kind,
                       "drawn": "the first tokens of numpy default_rng(42).permutation over every token of the "
                                "kind of every image (saev's activations.Dataset)"}
    else:
        src.mu, src.scale = torch.zeros(src.d_model, dtype=torch.float64), 1.0
        norm_record = {"method": "none"}
    if not (math.isfinite(src.scale) and src.scale > 0):
        raise VisaeError(f"the normalisation scale must be a positive number, got {src.scale}")
    sae = build_module(src)

    entry = {"name": name, "import": fmt, "path": str(path), **({"sha256": sha256} if sha256 else {})}
    config = dict(src.config or {})
    for k in ("architecture", "d_model", "width", "hparams", "normalisation"):
        config.pop(k, None)  # checkpoint.save writes them from the module
    if store is not None:
        info = store.info
        config.update(identity=store.identity(name).to_dict(), split=split_record(store.n_images, heldout, split_seed),
                      source={"model": info.model, "layer": info.layer, "dataset": info.dataset,
                              "store": str(store.root), "store_hash": store.store_hash,
                              "token_kind": token_kind, "d_model": store.d_model})
    elif src.config is None or any(v is not None for v in (model, dataset, layer)):
        config.update(identity={"model": model, "dataset": dataset, "layer": layer, "sae": name, "store_hash": None},
                      split={"heldout": heldout, "seed": split_seed, "method": SPLIT_METHOD},
                      source={"model": model, "layer": layer, "dataset": dataset, "store": None, "store_hash": None,
                              "token_kind": token_kind, "d_model": src.d_model})
    config["entry"] = {**(config.get("entry") or src.entry), **entry}  # what it was, and where it came from
    if src.config is None:
        config.update(tokens_seen=None, steps=None, seed=None, seed_from="imported", init=None, b_dec_init=None,
                      normalisation_sample=norm_record, data_seed=None, last={})
    config.update(name=name, status="done", failure=None, complete=True)
    config["imported"] = {"format": fmt, "path": str(path), "resolved": str(path.resolve()),
                          "sha256": files[main_file.name], "files": files, "normalisation": norm_record,
                          "source": _jsonable(src.info), "code": {"visae": _version(), **git_state()}}
    sae.config = config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    if marker is not None:
        Path(marker).unlink(missing_ok=True)  # first: a kill from here on leaves nothing that looks done
    (out / ckpt.CONFIG).unlink(missing_ok=True)
    ckpt.save(sae, out, config)  # weights, then config.json
    if marker is not None:
        write_json(marker, provenance({"import": entry, "store": None if store is None else str(store.root),
                                       "store_hash": None if store is None else store.store_hash,
                                       "out": str(out), "normalisation": norm_record, "heldout": heldout,
                                       "split_seed": split_seed, "token_kind": token_kind,
                                       "source_sha256": files}, seeds={"split": split_seed}, started=started))
    return ckpt.read_config(out)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _model_name(model) -> str:
    return str(model.get("name") if isinstance(model, dict) else model)


def _version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("visae")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- CLI -------------------------------------------------------------------------------------
def cmd_sae_export(args) -> int:
    out = export_saelens(args.sae, args.out)
    print(f"exported {args.sae} to {out} (SAELens {SAELENS_FORMAT} format)")
    return 0


def cmd_sae_import(args) -> int:
    cfg = import_sae(args.format, args.path, args.out, name=args.name, sha256=args.sha256, store_path=args.store,
                     model=args.model, dataset=args.dataset, layer=args.layer, heldout=args.heldout,
                     split_seed=args.split_seed, token_kind=None if args.token_kind == "all" else args.token_kind,
                     normalisation=args.normalisation, mean=args.mean, scale=args.scale, marker=args.marker)
    print(f"imported {args.path} ({args.format}) as a {cfg['architecture']} SAE of width {cfg['width']} into {args.out}")
    return 0


def _layer(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("sae", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="sae_command", metavar="<action>", required=True)
    e = sub.add_parser("export", help="write a visae SAE checkpoint as a SAELens folder (cfg.json + "
                                      "sae_weights.safetensors)")
    e.add_argument("--sae", required=True, help="visae SAE checkpoint folder (config.json, sae.safetensors)")
    e.add_argument("--out", required=True, help="the SAELens folder to write")
    e.add_argument("--format", default="saelens", choices=["saelens"], help="the format to write (default: saelens)")
    e.set_defaults(func=cmd_sae_export)
    i = sub.add_parser("import", help="write a visae SAE checkpoint from a saev file or a SAELens folder")
    i.add_argument("--format", required=True, choices=list(IMPORT_FORMATS))
    i.add_argument("--path", required=True, help="saev checkpoint file, or SAELens folder")
    i.add_argument("--out", required=True, help="the visae SAE checkpoint folder to write")
    i.add_argument("--name", default=None, help="the SAE's name (default: the file's stem or the folder's name)")
    i.add_argument("--sha256", default=None, help="refuse a source whose sha256 (saev: the file; SAELens: "
                                                  "sae_weights.safetensors) differs")
    i.add_argument("--store", default=None, help="activation store the SAE is for: its d_model is checked, its "
                                                 "identity and the held-out split recorded")
    i.add_argument("--model", default=None, help="without --store: the model name to record")
    i.add_argument("--dataset", default=None, help="without --store: the dataset name to record")
    i.add_argument("--layer", type=_layer, default=None, help="without --store: the layer to record")
    i.add_argument("--heldout", type=open_fraction, default=0.1, help="held-out fraction evaluations use "
                                                                      "(as `visae train --heldout`; default: 0.1)")
    i.add_argument("--split-seed", type=nonneg_int, default=0, help="seed of the held-out split (default: 0)")
    i.add_argument("--token-kind", default="all", choices=["all", "patches", "cls", "registers"],
                   help="the tokens evaluations read, and saev's normalisation sample (default: all)")
    i.add_argument("--normalisation", default="auto", choices=list(NORMALISATIONS),
                   help="saev: recompute saev's constants on --store, or none (default: auto: saev's for "
                        "saev <= 0.1 files, none for later ones)")
    i.add_argument("--mean", default=None, help="saev: the mean activation (torch.save'd tensor or .npy)")
    i.add_argument("--scale", type=positive_float, default=None, help="saev: the norm scale (with --mean)")
    i.add_argument("--marker", default=None, help="write provenance.json here last (the workflow's pass marker)")
    i.set_defaults(func=cmd_sae_import)

"""`visae evaluate`: an SAE's metrics on the held-out part of a store.

The held-out part is the `heldout` fraction of images that the SAE's split (its seed, recorded
in its config.json; the shared rule in visae.sae.split) holds out; it must lie inside what
training held out. An SAE trained on another model or layer than the store's is refused unless
`--allow-mismatch`, and then metrics.json says so (`source_mismatch`); the store, the SAE and
these checks are visae.analysis.on_store's. Sums are accumulated in
float64.
- L0: mean number of non-zero latents per token;
- MSE: mean over tokens and dimensions of the squared error, in the SAE's normalised space
  (the training loss's MSE); `mse_raw` is the same in raw activation units;
- NMSE: Σ ||x − x̂||² / Σ ||x − mean(x)||² (raw units); explained variance = 1 − NMSE;
- dead fraction: latents that never fire on the held-out tokens; dense fraction: latents firing
  on more than 1% of tokens;
- per latent: firing frequency and mean activation when firing (`latents.csv`), and a
  histogram of log10 firing frequency (in metrics.json).
Both files name what they are about, an `identity` (model, dataset, layer, SAE, store hash; see
visae.layout.Identity), and metrics.json carries the SAE's grid `entry` (its k or λ).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from visae.analysis.on_store import FROM_SAE, open_sae_on_store
from visae.args import device as device_arg, open_fraction, positive_int
from visae.atomic import atomic_path, clean_stale_temps, write_json
from visae.errors import VisaeError
from visae.layout import LATENTS, METRICS, RUN_MARKER
from visae.progress import counted
from visae.provenance import provenance

DENSE_THRESHOLD = 0.01
HIST_EDGES = list(np.arange(-8.0, 0.01, 0.5))  # log10 frequency bins; "never fired" is counted apart


@torch.no_grad()
def evaluate(store_path, sae_path, *, heldout: float | None = None, batch_size: int = 8192,
             device: str = "cpu", token_kind: str | None = FROM_SAE,
             allow_mismatch: bool = False) -> tuple[dict, dict]:
    """(metrics, per-latent arrays) of the SAE at `sae_path` on the store's held-out images."""
    ctx = open_sae_on_store(store_path, sae_path, heldout=heldout, token_kind=token_kind,
                            allow_mismatch=allow_mismatch, device=device)
    store, sae, cfg = ctx.store, ctx.sae, ctx.config
    heldout, split_seed, held, mismatch = ctx.heldout, ctx.split_seed, ctx.held, ctx.mismatch
    loader = ctx.loader(batch_size)
    h, d = sae.width, sae.d_model
    n = 0
    sq_err_n = torch.zeros((), dtype=torch.float64, device=device)
    sq_err_raw = torch.zeros((), dtype=torch.float64, device=device)
    sum_x = torch.zeros(d, dtype=torch.float64, device=device)
    sum_xx = torch.zeros((), dtype=torch.float64, device=device)
    l0_sum = torch.zeros((), dtype=torch.float64, device=device)
    fires = torch.zeros(h, dtype=torch.float64, device=device)
    act_sum = torch.zeros(h, dtype=torch.float64, device=device)
    for x in counted(loader, total=loader.tokens_per_epoch, desc=f"evaluate {cfg.get('name')}", unit="tokens",
                     unit_scale=True):
        xn = sae.normalise(x)
        f = sae.encode_norm(xn)
        xhat_n = sae.decode_norm(f)
        xhat = sae.denormalise(xhat_n)
        n += x.shape[0]
        sq_err_n += (xhat_n - xn).double().pow(2).sum()
        sq_err_raw += (xhat - x).double().pow(2).sum()
        xd = x.double()
        sum_x += xd.sum(0)
        sum_xx += xd.pow(2).sum()
        on = f != 0
        l0_sum += on.sum()
        fires += on.sum(0).double()
        act_sum += f.double().sum(0)
    if n == 0:
        raise VisaeError("the held-out split has no tokens")
    total_ss = (sum_xx - sum_x.pow(2).sum() / n).item()  # Σ ||x − mean||²
    nmse = sq_err_raw.item() / total_ss if total_ss > 0 else float("nan")
    freq = (fires / n).cpu().numpy()
    mean_act = torch.where(fires > 0, act_sum / fires.clamp_min(1), torch.zeros_like(act_sum)).cpu().numpy()
    fired = freq > 0
    logf = np.log10(freq[fired]) if fired.any() else np.array([])
    counts, _ = np.histogram(np.clip(logf, HIST_EDGES[0], HIST_EDGES[-1]), bins=HIST_EDGES)
    metrics = {
        "identity": store.identity(cfg.get("name")).to_dict(), "entry": cfg.get("entry"),
        "sae": cfg.get("name"), "architecture": cfg.get("architecture"), "width": h, "d_model": d,
        "tokens": n, "heldout": heldout, "split_seed": split_seed, "heldout_images": len(held),
        "source_mismatch": mismatch,
        "l0": l0_sum.item() / n, "mse": sq_err_n.item() / (n * d), "mse_raw": sq_err_raw.item() / (n * d),
        "nmse": nmse, "explained_variance": 1.0 - nmse,
        "dead_fraction": float((~fired).mean()), "dense_fraction": float((freq > DENSE_THRESHOLD).mean()),
        "dense_threshold": DENSE_THRESHOLD,
        "log10_freq_hist": {"edges": [float(e) for e in HIST_EDGES], "counts": counts.tolist(),
                            "never_fired": int((~fired).sum())},
        "store_hash": store.store_hash, "sae_tokens_seen": cfg.get("tokens_seen"),
    }
    for key in ("mse", "mse_raw", "nmse", "l0"):
        if not math.isfinite(metrics[key]):
            raise VisaeError(f"evaluation of {sae_path} gave {key} = {metrics[key]}: the SAE is broken")
    return metrics, {"frequency": freq, "mean_activation": mean_act}


def write_outputs(out, metrics: dict, latents: dict, config: dict, started: float) -> None:
    """metrics.json and latents.csv each carry the evaluation's identity (latents.csv as leading
    columns, so files of many SAEs concatenate into one table)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    # an earlier evaluation's done marker goes first: a kill below never leaves its metrics.json
    # beside this evaluation's latents.csv
    (out / METRICS).unlink(missing_ok=True)
    identity = metrics["identity"]
    with atomic_path(out / LATENTS) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([*identity, "latent", "frequency", "mean_activation"])
            for i, (fq, ma) in enumerate(zip(latents["frequency"], latents["mean_activation"])):
                w.writerow([*identity.values(), i, f"{fq:.9g}", f"{ma:.9g}"])
    write_json(out / RUN_MARKER, provenance(config, seeds={}, started=started))
    write_json(out / METRICS, metrics)  # last: its presence marks a finished evaluation


def cmd_evaluate(args) -> int:
    started = time.time()
    metrics, latents = evaluate(args.store, args.sae, heldout=args.heldout, batch_size=args.batch_size,
                                device=args.device, allow_mismatch=args.allow_mismatch)
    write_outputs(args.out, metrics, latents, {"store": args.store, "sae": args.sae, "heldout": metrics["heldout"],
                                               "batch_size": args.batch_size}, started)
    if metrics["source_mismatch"]:
        print(f"visae: warning: {metrics['source_mismatch']} (evaluated anyway: --allow-mismatch)", file=sys.stderr)
    print(f"{metrics['sae']}: L0 {metrics['l0']:.2f}  NMSE {metrics['nmse']:.4f}  dead {metrics['dead_fraction']:.3f}"
          f"  dense {metrics['dense_fraction']:.3f} -> {args.out}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--sae", required=True, help="SAE checkpoint directory")
    p.add_argument("--heldout", type=open_fraction, default=None,
                   help="held-out fraction (default: the one the SAE was trained with)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=positive_int, default=8192)
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="evaluate an SAE trained on another model or layer than the store's (metrics.json says so)")
    p.set_defaults(func=cmd_evaluate)

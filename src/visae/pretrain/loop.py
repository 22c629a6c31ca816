"""`visae pretrain`: the training loop of the offline demo's tiny ViTs, its outputs and its CLI.

Two pre-training objectives, the paper's CLIP-vs-DINOv2 contrast in miniature:
- `supervised`: cross-entropy on the CLS head, with the 10 garment labels;
- `simclr`: self-supervised contrastive learning (two augmented views per image, NT-Xent loss,
  a small projection head that is dropped after training).

The model is built through the backbone registry (`source: timm`, random init seeded with the
run seed) and trained on exactly the pixels that registry's preprocessing makes of each image, so
the checkpoint, reloaded with `source: pretrain`, sees at extraction what it saw in training.
Augmentations run batched on tensors, driven by one seeded `torch.Generator`; on CPU the same
seed gives the same weights file, byte for byte.

Outputs in `--out` (each written atomically; `model.safetensors` last, so its presence means the
run finished): `log.csv` (one row per step), `config.json` (model spec, hyperparameters, final
metrics incl. kNN and linear-probe accuracy on the test split, and the same at random init as a
baseline), `provenance.json`, `model.safetensors` (the backbone's state dict).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from visae.analysis.probes import probe_scores
from visae.args import device as device_arg, nonneg_float, nonneg_int, positive_float, positive_int
from visae.atomic import atomic_path, clean_stale_temps, write_json
from visae.errors import VisaeError
from visae.layout import PRETRAIN_LOG, PRETRAIN_WEIGHTS, RUN_MARKER
from visae.pretrain.objectives import ProjectionHead, nt_xent
from visae.pretrain.pixels import Pixels, flip_views, simclr_views
from visae.provenance import provenance

OBJECTIVES = ("supervised", "simclr")
N_CLASSES = 10
LOG_COLUMNS = ["step", "epoch", "images", "loss", "lr", "batch_acc"]

# The demo defaults, sized for about 1.5 minutes per objective on 2 idle CPU cores (measured on a
# busy machine: about 100 CPU-seconds per run with --threads 1, evaluation included).
DEFAULTS: dict[str, Any] = {
    "arch": "vit_tiny_patch16_224",
    "image_size": 28,
    "patch_size": 4,
    "depth": 4,
    "embed_dim": 64,
    "heads": 4,
    "mlp_ratio": 2.0,
    "max_images": 12000,
    "weight_decay": 0.05,
    "warmup_frac": 0.1,
    "grad_clip": 1.0,
    "temperature": 0.2,
    "proj_dim": 64,
    "eval_train": 5000,
    "eval_test": 2000,
    "knn_k": 20,
}
# Per objective: epochs, batch size and learning rate (about the same compute for both: SimCLR
# runs two views per image).
OBJECTIVE_DEFAULTS = {
    "supervised": {"epochs": 4, "batch_size": 64, "lr": 3e-3},
    "simclr": {"epochs": 2, "batch_size": 128, "lr": 2e-3},
}


# --------------------------------------------------------------------------- training

def _positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not float(value).is_integer()) or not math.isfinite(value) or value <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise VisaeError(f"{name} must be {what}, got {value!r}")


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero (step is 0-based)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


@contextlib.contextmanager
def _deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def model_kwargs_for(objective: str, patch_size: int, depth: int, embed_dim: int, heads: int,
                     mlp_ratio: float) -> dict[str, Any]:
    """timm kwargs of the demo ViT; the supervised model keeps its 10-class head, the SimCLR one
    has none (its projection head is not part of the backbone)."""
    return {
        "patch_size": patch_size, "in_chans": 3, "depth": depth, "embed_dim": embed_dim,
        "num_heads": heads, "mlp_ratio": mlp_ratio,
        "num_classes": N_CLASSES if objective == "supervised" else 0,
    }


def pretrain(
    objective: str,
    out: str | Path,
    *,
    arch: str = DEFAULTS["arch"],
    image_size: int = DEFAULTS["image_size"],
    patch_size: int = DEFAULTS["patch_size"],
    depth: int = DEFAULTS["depth"],
    embed_dim: int = DEFAULTS["embed_dim"],
    heads: int = DEFAULTS["heads"],
    mlp_ratio: float = DEFAULTS["mlp_ratio"],
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup_frac: float = DEFAULTS["warmup_frac"],
    grad_clip: float = DEFAULTS["grad_clip"],
    temperature: float = DEFAULTS["temperature"],
    proj_dim: int = DEFAULTS["proj_dim"],
    seed: int = 0,
    max_images: int = DEFAULTS["max_images"],
    eval_train: int = DEFAULTS["eval_train"],
    eval_test: int = DEFAULTS["eval_test"],
    knn_k: int = DEFAULTS["knn_k"],
    init_baseline: bool = True,
    data_root: str | Path | None = None,
    data_key: str | None = None,
    device: str = "cpu",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train one demo ViT; write `out`/{model.safetensors, config.json, log.csv, provenance.json}.

    Returns the config.json contents. Every user-fixable problem is a one-line `VisaeError`.
    """
    started = time.time()
    if objective not in OBJECTIVES:
        raise VisaeError(f"unknown pretraining objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if epochs is not None and steps is not None:
        raise VisaeError("give either epochs or steps, not both")
    epochs = OBJECTIVE_DEFAULTS[objective]["epochs"] if epochs is None and steps is None else epochs
    lr = OBJECTIVE_DEFAULTS[objective]["lr"] if lr is None else lr
    batch_size = OBJECTIVE_DEFAULTS[objective]["batch_size"] if batch_size is None else batch_size
    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("depth", depth),
                        ("embed_dim", embed_dim), ("heads", heads), ("batch_size", batch_size),
                        ("max_images", max_images), ("eval_train", eval_train), ("eval_test", eval_test),
                        ("knn_k", knn_k), ("proj_dim", proj_dim)):
        _positive(name, value)
    if steps is not None:
        _positive("steps", steps)
    if epochs is not None:
        _positive("epochs", epochs)
    for name, value in (("lr", lr), ("mlp_ratio", mlp_ratio), ("temperature", temperature)):
        _positive(name, value, float)
    for name, value in (("weight_decay", weight_decay), ("grad_clip", grad_clip)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise VisaeError(f"{name} must be a number >= 0, got {value!r}")
    if not 0 <= warmup_frac < 1:
        raise VisaeError(f"warmup_frac must be in [0, 1), got {warmup_frac!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise VisaeError(f"seed must be an integer >= 0, got {seed!r}")
    if image_size % patch_size:
        raise VisaeError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if embed_dim % heads:
        raise VisaeError(f"embed_dim {embed_dim} is not divisible by heads {heads}")
    if objective == "simclr" and min(batch_size, max_images) < 2:
        raise VisaeError("simclr needs at least 2 images per batch (its negatives are the other images)")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise VisaeError(f"unknown device {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VisaeError("device cuda requested but no CUDA GPU is available")

    from visae.data import open_dataset
    from visae.models import load_backbone

    data_spec = {"format": "fashion-mnist"}
    if data_root is not None:
        data_spec["root"] = str(data_root)
    try:
        train_ds = open_dataset(dict(data_spec, split="train"))
        test_ds = open_dataset(dict(data_spec, split="test"))
    except VisaeError as err:  # named by the config key it came from, as extraction's are
        raise VisaeError(f"{data_key}: {err}" if data_key else str(err)) from None
    if not hasattr(train_ds, "images"):  # pragma: no cover - fashion-mnist always has it
        raise VisaeError("visae pretrain needs the fashion-mnist format")

    mk = model_kwargs_for(objective, patch_size, depth, embed_dim, heads, mlp_ratio)
    build_spec = {"source": "timm", "arch": arch, "image_size": image_size, "model_kwargs": mk,
                  "init_seed": seed}
    bb = load_backbone(build_spec)
    model = bb.model
    pixels = Pixels(bb.transform)

    n = min(int(max_images), len(train_ds))
    batch = min(int(batch_size), n)
    gray_train = train_ds.images()[:n]
    labels_train = torch.from_numpy(train_ds.label_array()[:n])
    pixels.check(gray_train[:16])
    train_u8 = torch.from_numpy(pixels.geometry_u8(gray_train))
    n_test = min(int(eval_test), len(test_ds))
    test_u8 = torch.from_numpy(pixels.geometry_u8(test_ds.images()[:n_test]))
    test_y = torch.from_numpy(test_ds.label_array()[:n_test])
    n_bank = min(int(eval_train), n)
    bank_u8, bank_y = train_u8[:n_bank], labels_train[:n_bank]

    steps_per_epoch = n // batch
    total = int(steps) if steps is not None else int(epochs) * steps_per_epoch
    warmup = int(round(warmup_frac * total))
    hparams = {
        "objective": objective, "epochs": epochs, "steps": total, "steps_per_epoch": steps_per_epoch,
        "batch_size": batch, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup,
        "schedule": "linear warm-up, cosine decay to 0", "optimizer": "AdamW(betas=(0.9, 0.999))",
        "grad_clip": grad_clip, "max_images": n, "augment": "hflip" if objective == "supervised" else
        "random resized crop (area 0.35-1), hflip, rotate <=15 deg, brightness/contrast, erase p=0.5",
        "eval": {"bank_images": n_bank, "test_images": n_test, "knn_k": knn_k, "knn_t": 0.07,
                 "features": "final CLS token after the last norm"},
    }
    if objective == "simclr":
        hparams.update({"temperature": temperature, "proj_head": f"MLP {embed_dim}-{2 * embed_dim}-{proj_dim}"})
    run_config = {
        "arch": arch, "image_size": image_size, "model_kwargs": mk, "seed": seed,
        "data": {**data_spec, "split": "train", "images": n, "root": train_ds.spec.get("root")},
        "hyperparameters": hparams,
    }

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    weights_path = out / PRETRAIN_WEIGHTS
    weights_path.unlink(missing_ok=True)  # its presence marks a finished run: never a stale one

    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    baseline = None
    with _deterministic():
        if init_baseline:
            baseline = probe_scores(model, pixels, bank_u8, bank_y, test_u8, test_y, 512, device, knn_k, N_CLASSES)
        head = ProjectionHead(model.num_features, proj_dim).to(device) if objective == "simclr" else None
        params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))
        rows, t_train, last_loss = _train_loop(
            objective, model, head, opt, pixels, train_u8, labels_train, gen, total, batch, lr, warmup,
            grad_clip, temperature, device, progress)
        metrics = probe_scores(model, pixels, bank_u8, bank_y, test_u8, test_y, 512, device, knn_k, N_CLASSES)

    tail = [r["loss"] for r in rows[-max(1, min(20, len(rows) // 5)):]]
    metrics.update({
        "train_loss_first": rows[0]["loss"], "train_loss_last": last_loss,
        "train_loss_final_mean": round(float(np.mean(tail)), 6),
        "train_images_per_s": round(total * batch / t_train, 1) if t_train > 0 else None,
        "train_time_s": round(t_train, 2),
    })
    model_spec = {"source": "pretrain", "arch": arch, "weights": str(weights_path), "image_size": image_size,
                  "model_kwargs": mk}
    config = {
        **run_config, "objective": objective, "source": "pretrain", "weights": PRETRAIN_WEIGHTS,
        "model_spec": model_spec, "transform": repr(bb.transform).replace("\n", " "),
        "layout": bb.layout.to_dict(), "d_model": bb.d_model, "n_layers": bb.n_layers,
        "metrics": metrics, "metrics_at_init": baseline, "wall_time_s": round(time.time() - started, 2),
    }
    _write_log(out / PRETRAIN_LOG, rows)
    write_json(out / "config.json", config)
    write_json(out / RUN_MARKER, provenance(run_config, {"seed": seed}, started))
    from safetensors.torch import save_file
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return config


def _train_loop(objective, model, head, opt, pixels, train_u8, labels, gen, total, batch, lr, warmup,
                grad_clip, temperature, device, progress):
    from visae.progress import progress as progress_bar

    n = len(train_u8)
    steps_per_epoch = n // batch
    rows: list[dict] = []
    model.train()
    if head is not None:
        head.train()
    bar = progress_bar(total=total * batch, desc=f"pretrain {objective}", unit="images", unit_scale=True,
                       enabled=progress is not False)
    perm = None
    last = float("nan")
    t0 = time.perf_counter()
    try:
        for step in range(total):
            epoch, pos = divmod(step, steps_per_epoch)
            if pos == 0:
                perm = torch.randperm(n, generator=gen)
            idx = perm[pos * batch:(pos + 1) * batch]
            unit = pixels.to_unit(train_u8[idx]) if pixels.fast else None
            cur_lr = _lr_at(step, total, lr, warmup)
            for group in opt.param_groups:
                group["lr"] = cur_lr
            acc = None
            if objective == "supervised":
                x = pixels.normalise(flip_views(unit, gen)) if unit is not None else \
                    pixels.batch(train_u8[idx])
                y = labels[idx].to(device)
                logits = model(x.to(device))
                loss = F.cross_entropy(logits, y)
                acc = round(float((logits.argmax(1) == y).float().mean()), 4)
            else:
                if unit is None:
                    unit = pixels.batch(train_u8[idx]) * pixels.std + pixels.mean
                v1 = pixels.normalise(simclr_views(unit, gen)).to(device)
                v2 = pixels.normalise(simclr_views(unit, gen)).to(device)
                f = model.forward_head(model.forward_features(torch.cat([v1, v2])), pre_logits=True)
                z = head(f)
                loss = nt_xent(z[:len(idx)], z[len(idx):], temperature)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise VisaeError(
                    f"pretrain {objective}: loss became {value} at step {step + 1} of {total} "
                    f"(lr {cur_lr:.3g}): lower --lr; nothing was written"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            last = round(value, 6)
            rows.append({"step": step + 1, "epoch": epoch, "images": (step + 1) * batch, "loss": last,
                         "lr": cur_lr, "batch_acc": acc})
            bar.update(batch)
            bar.set_postfix_str(f"loss {value:.4f}", refresh=False)
    finally:
        bar.close()
    return rows, time.perf_counter() - t0, last


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if k == "lr" else r[k])) for k in LOG_COLUMNS})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


# --------------------------------------------------------------------------- CLI

# A models: entry's keys (given as `--model JSON`) and the flag each stands for, with its type.
ENTRY_FLAGS = {
    ("arch",): ("arch", str), ("image_size",): ("image_size", int),
    ("model_kwargs", "patch_size"): ("patch_size", int), ("model_kwargs", "depth"): ("depth", int),
    ("model_kwargs", "embed_dim"): ("embed_dim", int), ("model_kwargs", "num_heads"): ("heads", int),
    ("pretrain", "objective"): ("objective", str), ("pretrain", "steps"): ("steps", int),
    ("pretrain", "epochs"): ("epochs", int), ("pretrain", "batch_size"): ("batch_size", int),
    ("pretrain", "lr"): ("lr", float), ("pretrain", "max_images"): ("max_images", int),
    ("pretrain", "seed"): ("seed", int), ("pretrain", "eval_train"): ("eval_train", int),
    ("pretrain", "eval_test"): ("eval_test", int),
}


def apply_entry(args: argparse.Namespace) -> None:
    """Fill `args` from `--model`, a models: entry as a JSON object with its name (what the workflow
    passes, so a job's command changes only when its entry does); the entry's keys win over flags."""
    try:
        entry = json.loads(args.model)
    except ValueError as err:
        raise VisaeError(f"--model is not valid JSON ({err})") from None
    if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("pretrain"), dict):
        raise VisaeError("--model must be a models: entry as a JSON object with its name and a pretrain: block")
    for keys, (flag, kind) in ENTRY_FLAGS.items():
        value = entry
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            try:
                setattr(args, flag, kind(value))
            except (TypeError, ValueError):
                raise VisaeError(f"models.{entry['name']}.{'.'.join(keys)}: {value!r} is not {kind.__name__}") from None
    # timm's default, so that extraction builds the same architecture from model_kwargs
    args.mlp_ratio = float((entry.get("model_kwargs") or {}).get("mlp_ratio", 4.0))


def _data_key(args) -> str | None:
    """The config key of the pretraining data, when the command got a models: entry naming it."""
    entry = json.loads(args.model) if args.model is not None else {}
    dataset = entry.get("pretrain", {}).get("dataset")
    return f"datasets.{dataset}" if dataset else None


def cmd_pretrain(args: argparse.Namespace) -> int:
    if args.model is not None:
        apply_entry(args)
    if args.objective is None:
        raise VisaeError(f"give --objective ({', '.join(OBJECTIVES)}) or --model with a pretrain: block")
    if args.threads is not None:
        _positive("threads", args.threads)
        torch.set_num_threads(args.threads)
    cfg = pretrain(
        args.objective, args.out, arch=args.arch, image_size=args.image_size, patch_size=args.patch_size,
        depth=args.depth, embed_dim=args.embed_dim, heads=args.heads, mlp_ratio=args.mlp_ratio,
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, temperature=args.temperature, seed=args.seed,
        max_images=args.max_images, eval_train=args.eval_train, eval_test=args.eval_test,
        init_baseline=not args.no_baseline, data_root=args.data, data_key=_data_key(args), device=args.device,
        progress=False if args.quiet else None,
    )
    m = cfg["metrics"]
    accs = ", ".join(f"{k} {m[k]:.3f}" for k in ("head_acc", "knn_acc", "linear_probe_acc") if k in m)
    print(f"pretrain {cfg['objective']}: {cfg['hyperparameters']['steps']} steps in {m['train_time_s']:.1f} s, "
          f"loss {m['train_loss_first']:.4f} -> {m['train_loss_final_mean']:.4f}; test {accs}; wrote {args.out}")
    return 0


def add_cli(subparsers) -> None:
    d = DEFAULTS
    p = subparsers.add_parser("pretrain", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--objective", default=None, help=f"one of {', '.join(OBJECTIVES)}")
    p.add_argument("--model", default=None, metavar="ENTRY_JSON",
                   help="a models: entry as a JSON object with its name and pretrain: block (what the workflow "
                        "passes); its arch, image_size, model_kwargs and pretrain: keys win over the flags below")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--arch", default=d["arch"], help="timm ViT architecture")
    p.add_argument("--image-size", type=positive_int, default=d["image_size"])
    p.add_argument("--patch-size", type=positive_int, default=d["patch_size"])
    p.add_argument("--depth", type=positive_int, default=d["depth"])
    p.add_argument("--embed-dim", type=positive_int, default=d["embed_dim"])
    p.add_argument("--heads", type=positive_int, default=d["heads"])
    p.add_argument("--mlp-ratio", type=positive_float, default=d["mlp_ratio"])
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=None,
                        help="passes over the training images (default: supervised "
                             f"{OBJECTIVE_DEFAULTS['supervised']['epochs']}, simclr {OBJECTIVE_DEFAULTS['simclr']['epochs']})")
    length.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (instead of --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images per step (default: supervised {OBJECTIVE_DEFAULTS['supervised']['batch_size']}, "
                        f"simclr {OBJECTIVE_DEFAULTS['simclr']['batch_size']})")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"peak learning rate (default: supervised {OBJECTIVE_DEFAULTS['supervised']['lr']}, "
                        f"simclr {OBJECTIVE_DEFAULTS['simclr']['lr']})")
    p.add_argument("--weight-decay", type=nonneg_float, default=d["weight_decay"])
    p.add_argument("--temperature", type=positive_float, default=d["temperature"], help="NT-Xent temperature (simclr)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--max-images", type=positive_int, default=d["max_images"], help="first N training images")
    p.add_argument("--eval-train", type=positive_int, default=d["eval_train"],
                   help="training images used as kNN bank / probe training set")
    p.add_argument("--eval-test", type=positive_int, default=d["eval_test"], help="test images scored")
    p.add_argument("--no-baseline", action="store_true", help="skip scoring the random init")
    p.add_argument("--data", type=Path, default=None,
                   help="Fashion-MNIST folder (default: Debian's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's own, one per core); give the job's "
                        "share of the cores when jobs run side by side: oversubscribed threads spin")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

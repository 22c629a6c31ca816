"""`visae train`: train every SAE of a grid on one activation store, in one streamed pass.

One TokenLoader reads the store's training split once; each batch steps every SAE of the grid.
The whole run (every SAE's weights and Adam state, the loader position, the step, the RNG and
the per-SAE log offsets) is checkpointed atomically to `<out>/.train/state.safetensors` (tensors
plus a JSON header: the same state gives the same bytes), so a run killed
at any moment and rerun gives the same final bytes on CPU. A SAE whose loss turns NaN/inf is
stopped before the bad step is applied; its last good weights go to `<out>/<name>/checkpoint/`
and the others carry on. Outputs per SAE: `<out>/<name>/sae.safetensors`, `config.json`,
`log.csv` (one row per step, usable as a DVC plot); per run: `<out>/provenance.json`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import time
from pathlib import Path

import torch
import yaml

from visae.args import device as device_arg, nonneg_int, open_fraction, positive_int
from visae.atomic import atomic_path, clean_stale_temps
from visae.errors import VisaeError
from visae.layout import RUN_MARKER, SAE_LOG, Identity
from visae.precision import PRECISIONS, applied as precision_applied, resolve as resolve_precision
from visae.provenance import config_hash, git_state, provenance
from visae.sae import checkpoint as ckpt
from visae.sae.config import ARCH_KEYS, SPARSITY_KEY, validate_grid
from visae.sae.modules import build_sae, estimate_normalisation
from visae.sae.optim import lr_at, make_adam, sparsity_at
from visae.sae.split import split_images, split_record

NORM_TOKENS, NORM_SEED = 2 ** 19, 42  # the normalisation sample, as saev draws it
LOG_COLUMNS = ["step", "tokens", "loss", "mse", "l0", "lr", "l1_coeff", "aux", "dead"]
STATE = Path(".train") / "state.safetensors"
FLUSH_EVERY = 64  # steps between reads of the metrics from the device (log rows, NaN checks)


def entry_seed(entry: dict) -> int:
    """The entry's `seed:`, or one derived from its name: every SAE of a grid starts from its
    own weights unless the config shares a seed explicitly, and a rerun gets the same ones."""
    if entry.get("seed") is not None:
        return int(entry["seed"])
    return int.from_bytes(hashlib.sha256(f"visae-sae:{entry['name']}".encode()).digest()[:4], "big") >> 1


def load_grid(path: str | Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise VisaeError(f"grid file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise VisaeError(f"grid file {path} is not valid YAML ({str(err).splitlines()[0]})") from None


# -- one SAE under training ----------------------------------------------------------------
class Member:
    """One SAE of the grid: module, Adam, schedule, status and its CSV log.

    A step never waits for the device: its metrics stay on the device (`pending`) until `flush`
    reads them all at once, every FLUSH_EVERY steps and before each checkpoint. A non-finite
    loss or gradient sets the SAE's sticky `found_inf` on the device; fused Adam then skips the
    update (weights and state), and so do the decoder renormalisation and the bookkeeping, so
    the weights stay the last good ones until `flush` sees the flag and stops the SAE."""

    def __init__(self, entry: dict, d_model: int, device: str, out: Path, precision: str = "fp32"):
        self.entry, self.name = entry, entry["name"]
        self.arch = entry["architecture"]
        self.dir = out / self.name
        self.seed = entry_seed(entry)
        self.sae = build_sae(self.arch, d_model, entry["width"], seed=self.seed, init=entry["init"],
                             **{k: entry.get(k) for k in ARCH_KEYS[self.arch]}).to(device)
        self.sparsity = entry.get(SPARSITY_KEY.get(self.arch, ""), 0.0) or 0.0
        self.opt = make_adam(self.sae.parameters(), lr=entry["lr"], betas=entry["adam_betas"])
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.unit = torch.ones((), dtype=torch.float32, device=device)  # the check's "unscale" factor
        self.skips_on_device = bool(self.opt.defaults.get("fused"))
        if self.skips_on_device:
            self.opt.found_inf = self.found_inf  # read by fused Adam: a set flag skips the update
        self.precision = precision
        self.steps = max(1, entry["tokens"] // entry["batch_size"])
        self.step, self.tokens, self.status, self.failure = 0, 0, "running", None
        self.last = {}
        self.count_tokens()
        self.pending: list = []  # (step, tokens before it, lr, λ, its metrics on the device), not yet written
        self.log = None

    def open_log(self, offset: int, identity: Identity) -> None:
        """log.csv, each row led by the SAE's identity and architecture (the file names itself)."""
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow([*identity.to_dict().values(), self.arch])
        self.log_prefix = buf.getvalue() + ","
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / SAE_LOG
        mode = "r+b" if path.exists() and offset > 0 else "w+b"
        self.log = open(path, mode)
        self.log.truncate(offset)
        self.log.seek(offset)
        if offset == 0:
            self.log.write((",".join([*identity.to_dict(), "architecture", *LOG_COLUMNS]) + "\n").encode())
            self.log.flush()

    def train_step(self, xn: torch.Tensor) -> None:
        """One step, queued on the device without waiting for it (see the class docstring)."""
        lr = lr_at(self.step, self.entry["lr"], self.entry["lr_warmup"])
        lam = sparsity_at(self.step, self.sparsity, self.entry["l1_warmup"])
        self.sae.train()
        self.opt.zero_grad(set_to_none=False)
        with precision_applied(self.precision, xn.device):  # the rest of the step stays in fp32
            loss, m = self.sae.compute_grads(xn, lam)
        loss = loss.detach().float()
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        # one fused pass: sets found_inf if the loss or any gradient is not finite (× 1: unchanged)
        torch._amp_foreach_non_finite_check_and_unscale_([loss.reshape(1), *grads], self.found_inf, self.unit)
        zero = loss.new_zeros(())
        self.pending.append((self.step, self.tokens, lr, lam, torch.stack(
            [loss, m["mse"].float(), m["l0"].float(), m.get("aux", zero).float(), m.get("dead", zero).float(),
             self.found_inf])))
        if not self.skips_on_device and self.flush():  # an optimiser that cannot skip: ask now
            return
        applied = self.found_inf == 0
        self.sae.remove_parallel_grad()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.sae.normalise_decoder(applied)
        self.sae.after_step(m, xn.shape[0], applied)
        self.step += 1
        self.tokens += xn.shape[0]
        if self.step >= self.steps:
            self.status = "done"

    def flush(self) -> bool:
        """Write the pending steps' log rows (one read from the device); True if the SAE failed:
        then its rows stop before the first bad step, whose loss and settings name the failure."""
        if not self.pending:
            return self.status == "failed"
        rows = torch.stack([r for *_, r in self.pending]).cpu().tolist()
        batch = self.entry["batch_size"]
        lines = []
        for (step, tokens, lr, lam, _), (loss, mse, l0, aux, dead, bad) in zip(self.pending, rows):
            if bad:
                what = f"loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite"
                self.status = "failed"
                self.failure = (f"{what} at step {step} (lr {lr:g}, {SPARSITY_KEY.get(self.arch, 'k')} "
                                f"{self.sparsity if self.arch in SPARSITY_KEY else self.entry.get('k')})")
                self.step, self.tokens = step, tokens
                break
            row = {"step": step + 1, "tokens": tokens + batch, "loss": loss, "mse": mse,
                   "l0": l0, "lr": lr, "l1_coeff": lam, "aux": aux, "dead": dead}
            self.last = row
            lines.append(self.log_prefix + ",".join(f"{row[c]:.9g}" if isinstance(row[c], float) else str(row[c])
                                                    for c in LOG_COLUMNS) + "\n")
        if self.log is not None:  # None: a step timed by `visae bench train`
            self.log.write("".join(lines).encode())
        self.pending = []
        return self.status == "failed"

    def state(self) -> dict:
        assert not self.pending, "flush() before state()"
        self.log.flush()
        return {"model": ckpt.state_to_cpu(self.sae.state_dict()), "optim": self.opt.state_dict(),
                "step": self.step, "tokens": self.tokens, "status": self.status, "failure": self.failure,
                "log_offset": self.log.tell(), "last": self.last}

    def load(self, state: dict) -> None:
        self.sae.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.status, self.failure, self.last = state["status"], state["failure"], state["last"]
        self.count_tokens()

    def count_tokens(self) -> None:
        """Let an AuxK SAE count its tokens on the host (it skips AuxK before any can be dead)."""
        if hasattr(self.sae, "tokens_trained"):
            self.sae.tokens_trained = self.tokens


# -- the run ---------------------------------------------------------------------------------
def _sae_config(m: Member, store, run: dict, complete: bool) -> dict:
    info = store.info
    return {"name": m.name, "identity": store.identity(m.name).to_dict(),
            "entry": m.entry, "status": m.status, "failure": m.failure, "complete": complete,
            "tokens_seen": m.tokens, "steps": m.step, "seed": m.seed,
            "seed_from": "entry" if m.entry["seed"] is not None else "name",
            "init": m.entry["init"], "b_dec_init": m.entry["b_dec_init"],
            "source": {"model": info.model, "layer": info.layer, "dataset": info.dataset,
                       "store": str(store.root), "store_hash": store.store_hash,
                       "token_kind": run["token_kind"], "d_model": store.d_model},
            "split": run["split"], "normalisation_sample": run["normalisation_sample"], "precision": run["precision"],
            "data_seed": run["data_seed"], "code": {"visae": _version(), **git_state()},
            "last": m.last}


def _version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("visae")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _pack(obj, tensors: dict, key: str):
    """`obj` as JSON, its tensors moved into `tensors` under path-like keys (dict keys keep
    their type: the optimizer's state is keyed by int)."""
    if torch.is_tensor(obj):
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[k, _pack(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list": [_pack(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    return {"value": obj}


def _unpack(node, tensors: dict):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _unpack(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_unpack(v, tensors) for v in node["list"]]
    return node["value"]


def save_state_file(path: Path, state: dict) -> None:
    """The training state as safetensors + a JSON header: unlike torch.save (which writes a
    random serialization id), the same state always gives the same bytes."""
    from safetensors.torch import save_file
    tensors: dict = {}
    tree = json.dumps(_pack(state, tensors, "s"), sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"visae_state": tree})


def load_state(path: Path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            tree = json.loads(fh.metadata()["visae_state"])
    except Exception as err:  # safetensors raises its own error types
        raise VisaeError(f"training state {path} is unreadable ({err}): remove {path.parent} and rerun") from None
    return _unpack(tree, tensors)


TRAIN_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp16")  # fp16 training would need loss scaling


def unmark_outputs(out: Path) -> None:
    """Remove the done markers of an earlier run in `out` (provenance.json first, then every SAE's
    config.json), so that a fresh start killed midway never leaves old results that look finished.
    Only visae's own: SAE folders are those holding weights or a training log, and a folder with
    neither and no training state is not touched at all (`--out` may be shared with other files)."""
    saes = [d for d in sorted(out.iterdir()) if d.is_dir() and any(
        (d / name).is_file() for name in (ckpt.WEIGHTS, SAE_LOG, f"checkpoint/{ckpt.WEIGHTS}"))]
    if not saes and not (out / STATE).parent.is_dir():
        return
    (out / RUN_MARKER).unlink(missing_ok=True)
    for d in saes:
        (d / ckpt.CONFIG).unlink(missing_ok=True)
        (d / "checkpoint" / ckpt.CONFIG).unlink(missing_ok=True)


def train_grid(store_path, grid, out, *, tokens: int | None = None, checkpoint_every: int | None = None,
               device: str = "cpu", heldout: float = 0.1, data_seed: int = 0, split_seed: int = 0,
               token_kind: str | None = None, norm_tokens: int = NORM_TOKENS, progress: bool | None = None,
               stop_after_steps: int | None = None, restart_stale: bool = False, precision: str = "auto") -> dict:
    """Train every SAE of `grid` on the store; returns {name: status}. Raises VisaeError after the
    run if any SAE failed (the others are finished and saved). `precision`: the step's matmuls in
    "bf16" (autocast; fp32 weights and Adam state), "tf32" (CUDA) or "fp32"; "auto" is bf16 on
    CUDA, fp32 elsewhere."""
    from visae.store import ActivationStore, TokenLoader

    started = time.time()
    # The same bytes on CPU. On CUDA the mode would fill every new tensor with NaN first and warn
    # at each cuBLAS call; a CUDA run is reproducible to float rounding (tests/test_cuda.py).
    torch.use_deterministic_algorithms(str(device) == "cpu", warn_only=True)
    store = ActivationStore(store_path, verify=True)  # re-hash: never train/evaluate on a tampered store
    entries = validate_grid(grid, store.d_model)
    for flag, value in (("--tokens", tokens), ("--checkpoint-every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise VisaeError(f"{flag} must be an integer >= 1, got {value!r}")
    if tokens is not None:
        for e in entries:
            e["tokens"] = int(tokens)
    precision = resolve_precision(precision, device, TRAIN_PRECISIONS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)  # a killed run's half-written state, checkpoints and configs
    train_images, _ = split_images(store.n_images, heldout, split_seed)
    batch = entries[0]["batch_size"]
    loader = TokenLoader(store, batch, seed=data_seed, images=train_images, token_kind=token_kind,
                         epochs=None, dtype=torch.float32, device=device)
    n_norm = min(int(norm_tokens), loader.tokens_per_epoch)
    run = {"store_hash": store.store_hash, "grid": entries, "heldout": heldout, "data_seed": data_seed,
           "token_kind": token_kind, "split": split_record(store.n_images, heldout, split_seed),
           "normalisation_sample": {"tokens": n_norm, "seed": NORM_SEED, "drawn": "uniformly from the training split"},
           "checkpoint_every": checkpoint_every, "precision": precision}
    run_hash = config_hash(run)
    members = [Member(e, store.d_model, device, out, precision) for e in entries]

    state_path = out / STATE
    state = None
    if state_path.is_file():
        state = load_state(state_path)
        if state["run_hash"] != run_hash:
            if not restart_stale:
                raise VisaeError(f"{out} holds a training run with other settings (grid, store or split): "
                                 f"remove it, choose another --out, or pass --restart-stale")
            state = None
    if state is None:
        unmark_outputs(out)  # before anything else: a kill from here on leaves nothing that looks done
        state_path.unlink(missing_ok=True)
        # μ, the scale and b_dec's start from tokens drawn uniformly from the training split.
        mu, s = estimate_normalisation(lambda: loader.sample(n_norm, NORM_SEED))
        for m in members:
            if m.entry["normalize"]:
                m.sae.set_normalisation(mu.to(device), s)
            if m.entry["b_dec_init"] == "mean":
                m.sae.init_b_dec(m.sae.normalise(mu[None].to(device)))  # the sample's mean, normalised
            m.open_log(0, store.identity(m.name))
        global_step = 0
    else:
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        for m in members:
            m.load(state["saes"][m.name])
            m.open_log(state["saes"][m.name]["log_offset"], store.identity(m.name))
        global_step = state["global_step"]

    def save_state():
        save_state_file(state_path, {"run_hash": run_hash, "global_step": global_step, "loader": loader.state_dict(),
                                     "torch_rng": torch.get_rng_state(), "saes": {m.name: m.state() for m in members}})
        for m in members:
            ckpt.save(m.sae, m.dir / "checkpoint", _sae_config(m, store, run, complete=False))

    every = None if not checkpoint_every else max(1, int(checkpoint_every) // batch)
    total = max(m.steps for m in members) * batch
    from visae.progress import progress as progress_bar
    bar = progress_bar(total=total, initial=min(total, global_step * batch), desc="train", unit="tokens",
                       unit_scale=True, enabled=progress is not False)
    reported = {m.name for m in members if m.status == "failed"}

    def flush(running: list) -> list:
        """Read every pending step from the device; save a newly failed SAE's last good weights;
        return the SAEs still running."""
        for m in running:
            if m.flush() and m.name not in reported:
                reported.add(m.name)
                ckpt.save(m.sae, m.dir / "checkpoint", _sae_config(m, store, run, complete=False))
        bar.set_postfix_str(" | ".join(
            f"{m.name}: loss {m.last.get('loss', float('nan')):.4g} L0 {m.last.get('l0', 0):.1f}"
            for m in running[:3]), refresh=False)
        return [m for m in running if m.status == "running"]

    try:
        running = [m for m in members if m.status == "running"]
        if running:
            norm_cache: dict = {}
            for xb in loader:
                norm_cache.clear()
                for m in running:
                    key = (m.entry["normalize"],)
                    if key not in norm_cache:
                        norm_cache[key] = m.sae.normalise(xb)
                    m.train_step(norm_cache[key])
                global_step += 1
                bar.update(batch)
                checkpoint = bool(every) and global_step % every == 0
                stop = stop_after_steps is not None and global_step >= stop_after_steps
                if (global_step % FLUSH_EVERY == 0 or checkpoint or stop
                        or any(m.status != "running" for m in running)):
                    running = flush(running)
                if not running:
                    break
                if checkpoint:
                    save_state()
                if stop:
                    return {m.name: m.status for m in members}
            flush(running)
        save_state()
    finally:
        if any(m.status == "failed" for m in members):
            bar.leave = False  # the error names what finished: no summary line before it
        bar.close()
        for m in members:
            if m.log is not None:
                m.log.close()
    for m in members:
        if m.status == "done":
            ckpt.save(m.sae, m.dir, _sae_config(m, store, run, complete=True))
    from visae.atomic import write_json
    write_json(out / RUN_MARKER, provenance(
        {"store": str(store.root), "store_hash": store.store_hash, **{k: v for k, v in run.items() if k != "store_hash"}},
        seeds={"data": data_seed, "split": split_seed, **{m.name: m.seed for m in members}}, started=started))
    failed = [m for m in members if m.status == "failed"]
    if failed:
        m = failed[0]
        others = len(members) - len(failed)
        raise VisaeError(f"SAE {m.name!r} stopped: {m.failure}; its last good weights are in "
                         f"{m.dir / 'checkpoint'}"
                         + (f" ({len(failed) - 1} more failed)" if len(failed) > 1 else "")
                         + f"; {others} other SAE(s) finished")
    return {m.name: m.status for m in members}


def cmd_train(args) -> int:
    torch.manual_seed(0)
    if args.grid_json is not None:
        try:
            grid = json.loads(args.grid_json)
        except ValueError as err:
            raise VisaeError(f"--grid-json is not valid JSON ({err})") from None
    else:
        grid = load_grid(args.grid)
    statuses = train_grid(args.store, grid, args.out, tokens=args.tokens, checkpoint_every=args.checkpoint_every,
                          device=args.device, heldout=args.heldout, data_seed=args.seed, split_seed=args.split_seed,
                          token_kind=None if args.token_kind == "all" else args.token_kind,
                          restart_stale=args.restart_stale, precision=args.precision)
    print(f"trained {len(statuses)} SAE(s) into {args.out}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", required=True, help="activation store directory")
    grid = p.add_mutually_exclusive_group(required=True)
    grid.add_argument("--grid", help="YAML list of SAE entries (the config's saes:)")
    grid.add_argument("--grid-json", help="the same list as inline JSON (what the workflow passes)")
    p.add_argument("--out", required=True, help="output directory (one folder per SAE)")
    p.add_argument("--tokens", type=positive_int, default=None, help="override every entry's training tokens")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="tokens between checkpoints")
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--precision", choices=TRAIN_PRECISIONS, default="auto",
                   help="matmuls in bf16 (autocast, fp32 weights and Adam state), tf32 (CUDA) or fp32; auto: bf16 on CUDA")
    p.add_argument("--heldout", type=open_fraction, default=0.1, help="fraction of images kept out of training")
    p.add_argument("--seed", type=nonneg_int, default=0, help="data order seed")
    p.add_argument("--split-seed", type=nonneg_int, default=0, help="seed of the train / held-out split of the images")
    p.add_argument("--restart-stale", action="store_true",
                   help="if --out holds an unfinished run with other settings, discard it and start over")
    p.add_argument("--token-kind", default="all", choices=["all", "patches", "cls", "registers"])
    p.set_defaults(func=cmd_train)

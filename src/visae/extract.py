"""`visae extract`: record ViT activations of a dataset into activation stores.

One forward pass serves every requested layer; each layer gets its own store directory
`OUT/layer_<L>`, named by L as given (negative L counts from the end). Shard i holds images [i*S, (i+1)*S) and is written atomically, so a killed run
resumes at the first unfinished shard and ends with byte-identical files (on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visae.args import device as device_arg, nonneg_int, positive_int
from visae.atomic import clean_stale_temps, write_json
from visae.data.patches import VOTES
from visae.errors import VisaeError
from visae.layout import EXTRACT_MARKER, RUN_MARKER, layer_dir
from visae.precision import PRECISIONS, applied as precision_applied, resolve as resolve_precision
from visae.progress import progress as progress_bar
from visae.provenance import package_versions, provenance
from visae.store.format import STORE_DTYPES, canonical_dtype, to_storage
from visae.store.meta import StoreLayout, StoreMeta
from visae.store.writer import StoreWriter

TOKEN_CHOICES = ("patches", "cls", "all")
SHARD_BYTES = 256 << 20  # default shard size target
FP16_MAX = 65504.0  # beyond it a float16 is inf
PINNED_BYTES = 4 << 30  # page-locked host memory extraction may hold


class Fp16Overflow(VisaeError):
    """An activation a float16 store cannot hold: the store can never be completed in fp16."""


@dataclass
class ExtractPlan:
    """Everything decided before any file is touched, so bad input fails with nothing written."""
    backbone: object
    dataset: object
    layers: list[int]
    requested: list[int]
    token_idx: np.ndarray
    layout: StoreLayout
    dtype: str
    n_images: int
    batch_size: int
    shard_images: int
    skipped: list | None = None  # with --skip-bad-images: [{index, error}] of images left out


def token_selection(layout, tokens: str, keep_registers: bool, model_name: str) -> tuple[np.ndarray, StoreLayout]:
    """Indices into the model's token sequence [cls, registers, patches] and the stored layout."""
    if tokens not in TOKEN_CHOICES:
        raise VisaeError(f"unknown tokens {tokens!r}: use one of {', '.join(TOKEN_CHOICES)}")
    cls = list(range(layout.n_cls))
    regs = list(range(layout.n_cls, layout.n_prefix))
    patches = list(range(layout.n_prefix, layout.n_tokens))
    if tokens in ("cls",) and not cls:
        raise VisaeError(f"model {model_name} has no CLS token: use --tokens patches")
    groups = {"patches": [("patches", patches)],
              "cls": [("cls", cls)],
              "all": [("cls", cls), ("registers", regs if keep_registers else []), ("patches", patches)]}[tokens]
    if tokens == "patches" and keep_registers:
        groups = [("registers", regs), ("patches", patches)]
    stored = [name for name, idx in groups if idx]
    idx = np.array([i for _, g in groups for i in g], dtype=np.int64)
    return idx, StoreLayout.of_model(layout, stored)


def plan_extract(model_spec: dict, dataset_spec: dict, layers: list[int], *, tokens: str = "patches",
                 keep_registers: bool = False, dtype: str = "fp16", batch_size: int = 32,
                 max_images: int | None = None, shard_images: int | None = None,
                 backbone=None, dataset=None) -> ExtractPlan:
    from visae.data import open_dataset
    from visae.models import load_backbone

    dtype = canonical_dtype(dtype)
    if batch_size <= 0:
        raise VisaeError(f"batch size must be positive, got {batch_size}")
    if not layers:
        raise VisaeError("give at least one layer (--layers)")
    if max_images is not None and max_images <= 0:
        raise VisaeError(f"max images must be positive, got {max_images}")
    dataset = dataset if dataset is not None else open_dataset(dataset_spec)
    backbone = backbone if backbone is not None else load_backbone(model_spec)
    resolved, requested = [], []
    for layer in layers:
        r = backbone.resolve_layer(int(layer))
        if r not in resolved:
            resolved.append(r)
            requested.append(int(layer))
    token_idx, layout = token_selection(backbone.layout, tokens, keep_registers, backbone.name)
    n_images = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n_images == 0:
        raise VisaeError(f"dataset {dataset.name} has no images")
    if shard_images is None:
        per_image = len(token_idx) * backbone.d_model * np.dtype(STORE_DTYPES[dtype][0]).itemsize
        shard_images = max(batch_size, (SHARD_BYTES // per_image) // batch_size * batch_size)
    if shard_images <= 0:
        raise VisaeError(f"shard size must be positive, got {shard_images}")
    return ExtractPlan(backbone, dataset, resolved, requested, token_idx, layout, dtype,
                       n_images, int(batch_size), int(min(shard_images, n_images)))


class _Samples(torch.utils.data.Dataset):
    """Decoded, preprocessed images with labels and patch labels. Errors travel as values so the
    main process can report them as one line (DataLoader would wrap them in a traceback)."""

    def __init__(self, dataset, backbone):
        self.dataset, self.transform = dataset, backbone.transform
        self.mask_transform, self.grid = backbone.mask_transform, backbone.layout.grid
        self.ignore, self.vote = getattr(dataset, "ignore_index", None), dataset.patch_vote

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        from visae.data import patch_labels
        try:
            sample = self.dataset[i]
            pixels = self.transform(sample.image)
            plabels = (None if sample.mask is None else
                       patch_labels(self.mask_transform(sample.mask), tuple(self.grid), self.ignore, self.vote))
            return pixels, int(sample.label), plabels, None
        except Exception as err:  # noqa: BLE001 - reported by the main process
            return None, None, None, str(err) if isinstance(err, VisaeError) else f"image {i}: {err!r}"


def _collate(items):
    for _, _, _, error in items:
        if error is not None:
            return None, None, None, error
    pixels = torch.stack([p for p, _, _, _ in items])
    labels = np.array([label for _, label, _, _ in items], dtype=np.int64)
    plabels = None if items[0][2] is None else np.stack([pl for _, _, pl, _ in items]).astype(np.int16)
    return pixels, labels, plabels, None


class _Kept(torch.utils.data.Dataset):
    """The readable images of a dataset, in order (what --skip-bad-images extracts)."""

    def __init__(self, dataset, keep: list[int]):
        self.base, self.keep = dataset, keep
        self.n_images_total = len(dataset)

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, i):
        return self.base[self.keep[i]]

    def __getattr__(self, name):  # name, classes, spec, ignore_index, has_masks of the dataset
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class _Probe(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            self.dataset[i]
            return None
        except Exception as err:  # noqa: BLE001 - recorded, the image is skipped
            return str(err) if isinstance(err, VisaeError) else f"image {i}: {err!r}"


def skip_unreadable(plan: ExtractPlan, num_workers: int | None = None) -> ExtractPlan:
    """Decode every planned image once, before any file is written, and leave out those that
    fail; the plan then records them. Same data, same list: a rerun resumes the same store."""
    workers = default_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(_Probe(plan.dataset), batch_size=None, num_workers=workers,
                                         sampler=range(plan.n_images))
    skipped = [{"index": i, "error": err} for i, err in enumerate(loader) if err is not None]
    bad = {s["index"] for s in skipped}
    keep = [i for i in range(plan.n_images) if i not in bad]
    if not keep:
        raise VisaeError(f"dataset {plan.dataset.name}: none of its {plan.n_images} images can be read")
    plan.dataset, plan.n_images, plan.skipped = _Kept(plan.dataset, keep), len(keep), skipped
    plan.shard_images = min(plan.shard_images, plan.n_images)
    return plan


def _batch_sampler(start: int, n_images: int, shard_images: int, batch_size: int):
    """Batches that never cross a shard boundary, so resumed runs see identical batches."""
    for shard_start in range(start, n_images, shard_images):
        shard_stop = min(shard_start + shard_images, n_images)
        for a in range(shard_start, shard_stop, batch_size):
            yield list(range(a, min(a + batch_size, shard_stop)))


def default_workers(device: str = "cpu") -> int:
    """Decoding workers: on CPU they share the cores with the forward pass; on CUDA the
    forward needs none, so all but the main process's core decode."""
    cores = (os.cpu_count() or 1) - 1
    return max(0, min(16 if torch.device(device).type == "cuda" else 4, cores))


def run_extract(plan: ExtractPlan, out: str | os.PathLike, *, device: str = "cpu", precision: str = "auto",
                num_workers: int | None = None, progress: bool = True,
                config: dict | None = None) -> list[Path]:
    """Write one store per layer under `out`; return their paths. `precision` is the forward
    pass's (PRECISIONS); other than fp32 it is recorded in each store's job (meta.json), so a
    resume at another precision is refused."""
    started = time.time()
    precision = resolve_precision(precision, device)  # PRECISIONS, of the forward pass (not the store's dtype)
    backbone, dataset = plan.backbone, plan.dataset
    out = Path(out)
    clean_stale_temps(out)  # a killed run's temporary files, in every store below
    # `identity` says which model made the activations (a resume by another model is refused);
    # the weights' path is beside it, not in it, so that a moved file still resumes.
    model_info = {"name": backbone.name, "source": backbone.source, "arch": backbone.arch,
                  "d_model": backbone.d_model, "n_layers": backbone.n_layers,
                  "patch_size": list(backbone.patch_size), "image_size": list(backbone.image_size),
                  "activation": backbone.activation, "weights": backbone.weights,
                  "identity": backbone.identity}
    has_masks = bool(getattr(dataset, "has_masks", False))
    dataset_info = {"name": dataset.name, "spec": getattr(dataset, "spec", None),
                    "n_images_total": getattr(dataset, "n_images_total", len(dataset)),
                    "classes": list(dataset.classes),
                    "ignore_index": getattr(dataset, "ignore_index", None),
                    "has_masks": has_masks, "patch_vote": dataset.patch_vote if has_masks else None}
    if plan.skipped is not None:  # recorded in meta.json and in the resume key
        dataset_info["skipped_images"] = plan.skipped
    writers = {}
    for layer, requested in zip(plan.layers, plan.requested):
        meta = StoreMeta(model=model_info, layer=layer, layer_requested=requested, dataset=dataset_info,
                         transform=repr(backbone.transform), dtype=plan.dtype, d_model=backbone.d_model,
                         layout=plan.layout, packages=package_versions())
        job = {"model": {k: v for k, v in model_info.items() if k != "weights"}, "dataset": dataset_info,
               "layer": layer, "layout": plan.layout.to_dict(), "dtype": plan.dtype, "n_images": plan.n_images,
               "batch_size": plan.batch_size, "shard_images": plan.shard_images}
        if precision != "fp32":  # absent: fp32, as every store made before the option
            job["precision"] = precision
        # Named as requested (layer_-2), so a workflow can name the folder without loading the model.
        writers[layer] = StoreWriter(out / layer_dir(requested), meta, job, plan.shard_images, plan.n_images)
    (out / EXTRACT_MARKER).unlink(missing_ok=True)
    done = {layer: w.open() for layer, w in writers.items()}
    first = min(done.values())
    n_shards = next(iter(writers.values())).n_shards
    start_image = first * plan.shard_images

    model_device = torch.device(device)
    backbone.to(model_device)
    cuda = model_device.type == "cuda"
    workers = default_workers(device) if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        _Samples(dataset, backbone), batch_sampler=list(_batch_sampler(start_image, plan.n_images,
                                                                       plan.shard_images, plan.batch_size)),
        collate_fn=_collate, num_workers=workers, pin_memory=cuda,
        prefetch_factor=4 if workers else None, persistent_workers=False)

    jobs: queue.Queue = queue.Queue(maxsize=2)
    spare: queue.SimpleQueue = queue.SimpleQueue()  # written shards' buffers, filled again
    failure: list[BaseException] = []

    def write_loop():
        while (job := jobs.get()) is not None:
            index, buffers = job
            if not failure:
                try:
                    arrays = _shard_arrays(buffers, plan.dtype, writers[plan.layers[0]].shard_range(index))
                    for layer, w in writers.items():
                        if index >= done[layer]:
                            w.write_shard(index, arrays[layer])
                except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                    failure.append(err)
            spare.put(buffers)

    writer_thread = threading.Thread(target=write_loop, daemon=True)
    writer_thread.start()
    bar = progress_bar(total=plan.n_images, initial=start_image, desc="extract", unit="images", enabled=progress)
    # Pinned host buffers (asynchronous copies) while the up to four shard sets in flight fit
    # PINNED_BYTES; beyond it (many layers) pageable ones, whose copies wait instead.
    shard_set = plan.shard_images * len(plan.token_idx) * backbone.d_model * len(plan.layers)
    pin = cuda and 4 * shard_set * STORE_DTYPES[plan.dtype][1].itemsize <= PINNED_BYTES
    token_idx = torch.from_numpy(plan.token_idx).to(model_device)  # on the device: indexing copies no index
    store_dtype = STORE_DTYPES[plan.dtype][1]
    check_range = plan.dtype == "float16" or precision == "fp16"  # float16 in the store or the forward pass
    try:
        shard, filled, buffers, peaks = first, 0, None, {}
        for pixels, labels, plabels, error in loader:
            if error is not None:
                raise VisaeError(error)
            if failure:
                raise failure[0]
            if buffers is None:
                buffers = _buffers(spare, plan, plabels is not None, pin=pin)
            with precision_applied(precision, device):
                acts = backbone.record(pixels.to(model_device, non_blocking=True), plan.layers)
            n = len(labels)
            # Converted on the device and copied without waiting: the host waits once a shard.
            for layer in plan.layers:
                kept = acts[layer].index_select(1, token_idx)
                if check_range:  # the largest |activation| so far, kept on the device
                    peak = kept.abs().amax()
                    peaks[layer] = peak if layer not in peaks else torch.maximum(peaks[layer], peak)
                buffers[layer]["acts"][filled:filled + n].copy_(kept.to(store_dtype), non_blocking=True)
                buffers[layer]["labels"][filled:filled + n] = labels
                if plabels is not None:
                    buffers[layer]["patch_labels"][filled:filled + n] = plabels
            filled += n
            bar.update(n)
            lo, hi = writers[plan.layers[0]].shard_range(shard)
            if filled == hi - lo:
                if cuda:
                    torch.cuda.synchronize(model_device)  # the shard's copies have landed
                for layer, requested in zip(plan.layers, plan.requested):
                    if layer in peaks:
                        _check_fp16_range(float(peaks[layer]), requested, backbone.name, plan.dtype, precision)
                jobs.put((shard, buffers))
                shard, filled, buffers, peaks = shard + 1, 0, None, {}
    finally:
        jobs.put(None)  # the writer finishes the shards already queued, then stops
        writer_thread.join()
        bar.close()
        if sys.exc_info()[0] is not None:
            _remove_empty(writers.values(), out, unfinishable=isinstance(sys.exc_info()[1], Fp16Overflow))
    if failure:
        raise failure[0]
    if shard != n_shards:
        raise RuntimeError(f"extraction stopped at shard {shard} of {n_shards}")
    for layer, w in writers.items():
        write_json(w.root / RUN_MARKER,
                   provenance(config or {"job": w.job}, seeds={}, started=started))
    # Written last: its presence means every store under `out` is complete (the DAG's output).
    write_json(out / EXTRACT_MARKER, {
        "model": model_info, "dataset": dataset_info, "n_images": plan.n_images,
        "stores": {w.root.name: {"layer": layer, "store_hash": _store_hash(w)}
                   for layer, w in writers.items()}})
    return [w.root for w in writers.values()]


def _store_hash(writer: StoreWriter) -> str:
    from visae.store import ActivationStore
    return ActivationStore(writer.root).store_hash


def _check_fp16_range(peak: float, layer: int, model_name: str, dtype: str, precision: str) -> None:
    """`peak`: a layer's largest |activation| in a shard, against float16's range where the store
    (dtype) or the forward pass (precision) is float16. An fp16 forward pass that overflows gives
    NaN from there on."""
    fixes = []
    if dtype == "float16":
        fixes.append("dtype bf16 or fp32 (--dtype, or dtype: under extract: in the config)")
    if precision == "fp16":
        fixes.append("precision bf16 or fp32 (--precision, or precision: under extract: in the config)")
    if peak > FP16_MAX:
        raise Fp16Overflow(f"layer {layer} of {model_name} has activations up to {peak:.4g}, beyond float16's "
                           f"±65,504: extract with {' and '.join(fixes)}")
    if precision == "fp16" and peak != peak:
        raise Fp16Overflow(f"layer {layer} of {model_name} has NaN activations: the fp16 forward pass overflowed "
                           f"float16's ±65,504; extract with {fixes[-1]}")


def _remove_empty(writers, out: Path, unfinishable: bool = False) -> None:
    """After a failure, delete stores that hold no finished shard (nothing worth resuming), or
    every store of the run when it can never be completed (an fp16 overflow recurs on resume)."""
    for w in writers:
        if unfinishable:
            w.remove()
        elif not w.shards and w.meta_path.exists():
            w.meta_path.unlink()
            if not any(w.root.iterdir()):
                w.root.rmdir()
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _buffers(spare: queue.SimpleQueue, plan: ExtractPlan, with_patch_labels: bool, pin: bool) -> dict:
    """A shard's host buffers (pinned for CUDA's asynchronous copies), shard_images rows each:
    a written shard's, or new ones while the writer still holds them all."""
    try:
        return spare.get_nowait()
    except queue.Empty:
        pass
    shape = (plan.shard_images, len(plan.token_idx), plan.backbone.d_model)
    out = {}
    for layer in plan.layers:
        out[layer] = {"acts": torch.empty(shape, dtype=STORE_DTYPES[plan.dtype][1], pin_memory=pin),
                      "labels": np.empty(plan.shard_images, dtype=np.int64)}
        if with_patch_labels:
            g = plan.backbone.layout.grid
            out[layer]["patch_labels"] = np.empty((plan.shard_images, g[0] * g[1]), dtype=np.int16)
    return out


def _shard_arrays(buffers: dict, dtype: str, shard_range: tuple[int, int]) -> dict:
    """The arrays a shard's files hold: its rows of the buffers, as numpy views (no copy)."""
    n = shard_range[1] - shard_range[0]
    return {layer: {kind: to_storage(b[:n], dtype) if kind == "acts" else b[:n] for kind, b in bufs.items()}
            for layer, bufs in buffers.items()}


# -- CLI --------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="SOURCE:ARCH (e.g. open_clip:ViT-B-16, timm:vit_base_patch14_reg4_dinov2) "
                        "or a name under models: in --config, or that entry as a JSON object with its name")
    p.add_argument("--weights", help="local weights file (.safetensors/.pt/.bin)")
    p.add_argument("--pretrained", help="hub tag to download (e.g. openai); default: random init")
    p.add_argument("--image-size", type=positive_int, help="input resolution override")
    p.add_argument("--config", help="config YAML with models:/datasets: entries to look names up in")


def resolve_model_spec(args) -> dict:
    from visae.models import parse_model_arg
    spec = _named(args, "models", args.model) or parse_model_arg(args.model)
    for key in ("weights", "pretrained", "image_size"):
        if getattr(args, key, None) is not None:
            spec[key] = getattr(args, key)
    return spec


def resolve_dataset_spec(args) -> dict:
    from visae.data import parse_dataset_arg
    spec = _named(args, "datasets", args.dataset) or parse_dataset_arg(args.dataset)
    if getattr(args, "split", None):
        spec["split"] = args.split
    if getattr(args, "patch_vote", None):
        spec["patch_vote"] = args.patch_vote
    return spec


def _named(args, section: str, name: str) -> dict | None:
    """A config entry: given inline as a JSON object with its name (what the workflow passes, so
    a job's command changes only when its own entry does), or looked up by name in --config."""
    if name.lstrip().startswith("{"):
        try:
            entry = json.loads(name)
        except ValueError as err:
            raise VisaeError(f"--{section[:-1]} is not valid JSON ({err})") from None
        if not isinstance(entry, dict) or "name" not in entry:
            raise VisaeError(f"--{section[:-1]} as JSON must be an object with a name")
        return entry
    if not getattr(args, "config", None):
        return None
    import yaml
    path = Path(args.config)
    if not path.is_file():
        raise VisaeError(f"config file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise VisaeError(f"config file {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    entries = (config.get(section) if isinstance(config, dict) else None) or {}
    if not isinstance(entries, dict):
        raise VisaeError(f"config file {path}: {section}: must map names to entries")
    if name in entries:
        return {"name": name, **entries[name]}
    return None


def add_cli(sub) -> None:
    p = sub.add_parser("extract", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--dataset", required=True,
                   help="FORMAT[:ROOT] (e.g. imagefolder:DIR, camvid:DIR, fashion-mnist) or a name in --config")
    p.add_argument("--split", help="dataset split (train/test/val...)")
    p.add_argument("--patch-vote", choices=VOTES,
                   help="how per-patch labels are voted from masks: labelled-majority (default: the most "
                        "frequent label but the ignore label) or all-pixel-mode (the paper's: every pixel)")
    p.add_argument("--layers", type=int, nargs="+", required=True,
                   help="blocks whose output (residual stream) to record; negative counts from the end")
    p.add_argument("--tokens", choices=TOKEN_CHOICES, default="patches", help="which tokens to keep")
    p.add_argument("--keep-registers", action="store_true", help="keep register tokens (dropped by default)")
    p.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-images", type=positive_int, help="use only the first N images")
    p.add_argument("--shard-images", type=positive_int, help="images per shard (default: about 256 MiB shards)")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the forward pass's: auto (default: bf16 on CUDA, fp32 on CPU), fp32, tf32 (CUDA's TF32 "
                        "matmuls), or bf16/fp16 autocast; the store's dtype is --dtype")
    p.add_argument("--workers", type=nonneg_int,
                   help=f"data loader workers (default {default_workers('cpu')} on CPU, "
                        f"{default_workers('cuda')} on CUDA)")
    p.add_argument("--out", required=True, help="output folder; each layer goes to OUT/layer_<L> (L as given)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be read (decoded once first) and list them in "
                        "meta.json's dataset.skipped_images; by default an unreadable image stops the run")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_extract)


def _in_config(args, section: str, name: str, opener, spec: dict):
    """Open a dataset/model; errors name the config key that locates it."""
    try:
        return opener(spec)
    except VisaeError as err:
        entry = _named(args, section, name)
        if entry is None:
            raise
        where = f" in {args.config}" if getattr(args, "config", None) else ""
        raise VisaeError(f"{section}.{entry['name']}{where}: {err}") from None


def cmd_extract(args) -> int:
    from visae.data import open_dataset
    from visae.models import load_backbone

    model_spec, dataset_spec = resolve_model_spec(args), resolve_dataset_spec(args)
    canonical_dtype(args.dtype)
    dataset = _in_config(args, "datasets", args.dataset, open_dataset, dataset_spec)
    backbone = _in_config(args, "models", args.model, load_backbone, model_spec)
    plan = plan_extract(model_spec, dataset_spec, args.layers,
                        tokens=args.tokens, keep_registers=args.keep_registers, dtype=args.dtype,
                        batch_size=args.batch_size, max_images=args.max_images,
                        shard_images=args.shard_images, backbone=backbone, dataset=dataset)
    if args.skip_bad_images:
        plan = skip_unreadable(plan, args.workers)
        for s in plan.skipped:
            print(f"skipped: {s['error']}", file=sys.stderr)
    paths = run_extract(plan, args.out, device=args.device, precision=args.precision, num_workers=args.workers,
                        progress=not args.no_progress, config=vars(args) | {"func": None})
    for path in paths:
        meta = StoreMeta.load(path)
        print(f"{path}: {meta.n_images} images x {meta.layout.n_tokens} tokens x "
              f"{meta.d_model} ({meta.dtype}), {meta.n_shards} shards")
    return 0

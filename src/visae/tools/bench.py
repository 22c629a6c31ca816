"""`visae bench <name>`: performance figures, each next to its limit measured in the same run.

Every bench prints one JSON object and writes it to results/bench/<name>.json with at least
`bench`, `device`, `params`, `ratios` (name -> measured / limit) and `goals` (name -> required).
Ratios, not absolute times, are what carries across shared machines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from visae.args import device as device_arg, json_object, nonneg_int, positive_int
from visae.atomic import write_json
from visae.errors import VisaeError
from visae.layout import Layout
from visae.provenance import device_info, package_versions
from visae.sae.train import TRAIN_PRECISIONS
from visae.tools.bench_train import SHAPES

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "data" / "imagenet-sample"
DEFAULT_OUT = Path(Layout().bench_dir())


def _report(result: dict, out_dir: Path) -> dict:
    result["device"] = device_info()
    result["packages"] = package_versions()
    result["meets_goals"] = {k: result["ratios"][k] >= g for k, g in result["goals"].items()}
    write_json(out_dir / f"{result['bench']}.json", result)
    print(json.dumps(result, indent=2, sort_keys=True))
    return result


def bench_extract(model: str = "open_clip:ViT-B-16", dataset: str | None = None, layers=(-2,),
                  images: int = 64, batch_size: int = 16, workers: int | None = None,
                  device: str = "cpu", image_size: int | None = None, out_dir: Path = DEFAULT_OUT,
                  precision: str = "auto") -> dict:
    """Images/s of `visae extract` against the model's recording forward pass alone on the same
    preprocessed tensors (same layers, same batches, same precision): the ratio is 1 - data and
    IO overhead."""
    from visae.data import parse_dataset_arg
    from visae.extract import default_workers, plan_extract, run_extract
    from visae.precision import applied, resolve as resolve_precision
    from visae.models import parse_model_arg

    if dataset is None:
        if not DEFAULT_IMAGES.is_dir():
            raise VisaeError(f"no --dataset given and {DEFAULT_IMAGES} is absent")
        dataset = f"imagenet-sample:{DEFAULT_IMAGES}"
    precision = resolve_precision(precision, device)
    workers = default_workers(device) if workers is None else workers
    spec = parse_model_arg(model)
    if image_size:
        spec["image_size"] = image_size
    plan = plan_extract(spec, parse_dataset_arg(dataset), list(layers), batch_size=batch_size,
                        max_images=images)
    backbone = plan.backbone.to(device)
    pixels = torch.stack([backbone.transform(plan.dataset[i].image) for i in range(plan.n_images)])
    batches = [pixels[a:a + batch_size].to(device) for a in range(0, plan.n_images, batch_size)]

    def sync():  # CUDA runs asynchronously: a timing starts and ends with the device idle
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def forward_alone() -> float:
        sync()
        t = time.perf_counter()
        with applied(precision, device):
            for b in batches:
                backbone.record(b, plan.layers)
        sync()
        return plan.n_images / (time.perf_counter() - t)

    forward_alone()  # warm-up
    before = forward_alone()
    with tempfile.TemporaryDirectory() as tmp:
        sync()
        t = time.perf_counter()
        run_extract(plan, tmp, device=device, precision=precision, num_workers=workers, progress=False)
        sync()
        extract_ips = plan.n_images / (time.perf_counter() - t)
    after = forward_alone()
    forward_ips = (before + after) / 2
    return _report({
        "bench": "extract",
        "params": {"model": model, "dataset": dataset, "layers": plan.layers, "images": plan.n_images,
                   "batch_size": batch_size, "workers": workers, "dtype": plan.dtype, "precision": precision,
                   "image_size": list(backbone.image_size), "torch_threads": torch.get_num_threads()},
        "extract_images_per_s": extract_ips,
        "forward_images_per_s": forward_ips,
        "forward_images_per_s_runs": [before, after],
        "ratios": {"extract_vs_forward": extract_ips / forward_ips},
        "goals": {"extract_vs_forward": 0.8},
    }, out_dir)


def _synthetic_store(root: Path, images: int, tokens: int, d_model: int, shard_images: int) -> Path:
    from visae.store import StoreLayout, StoreMeta, StoreWriter
    writer = StoreWriter(root, StoreMeta(dtype="float16", d_model=d_model, layout=StoreLayout.patches((1, tokens))),
                         {"bench": "loader"}, shard_images, images)
    writer.open()
    rng = np.random.default_rng(0)
    for i in range(writer.n_shards):
        a, b = writer.shard_range(i)
        writer.write_shard(i, {"acts": rng.standard_normal((b - a, tokens, d_model), dtype=np.float32)
                               .astype(np.float16), "labels": np.zeros(b - a, dtype=np.int64)})
    return root


def bench_loader(store: str | None = None, batch_size: int = 4096, images: int = 2048, tokens: int = 196,
                 d_model: int = 384, shard_images: int = 256, dtype: str = "float32", repeats: int = 3,
                 workers: int | None = None, device: str = "cpu", out_dir: Path = DEFAULT_OUT) -> dict:
    """Tokens/s of the shuffled TokenLoader, batches landed on `device` (synchronised), against a
    plain sequential read of the same shard files (both from the page cache, best of `repeats`)."""
    from visae.store import ActivationStore, TokenLoader
    from visae.store.loader import default_workers

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(store) if store else _synthetic_store(Path(tmp) / "store", images, tokens, d_model, shard_images)
        st = ActivationStore(root)
        files = [root / name for s in st.info.shards for name in s["files"] if name.startswith("acts_")]
        size = max(f.stat().st_size for f in files)
        buf = bytearray(size)

        def sequential() -> float:
            t = time.perf_counter()
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf) > 0:
                        pass
            return st.n_tokens / (time.perf_counter() - t)

        def loader() -> float:
            dl = TokenLoader(st, batch_size, seed=0, epochs=1, dtype=getattr(torch, dtype), workers=workers,
                             device=device)
            sync()
            n, t = 0, time.perf_counter()
            for batch in dl:
                n += len(batch)
            sync()
            return n / (time.perf_counter() - t)

        sequential()  # bring the files into the page cache
        seq = max(sequential() for _ in range(repeats))
        lod = max(loader() for _ in range(repeats))
        return _report({
            "bench": "loader",
            "params": {"store": str(store) if store else "synthetic", "batch_size": batch_size,
                       "n_tokens": st.n_tokens, "d_model": st.d_model, "store_dtype": st.dtype_name,
                       "output_dtype": dtype, "repeats": repeats, "device": device,
                       "workers": workers or default_workers(), "torch_threads": torch.get_num_threads()},
            "loader_tokens_per_s": lod,
            "sequential_read_tokens_per_s": seq,
            "ratios": {"loader_vs_sequential_read": lod / seq},
            "goals": {"loader_vs_sequential_read": 0.8},
        }, out_dir)


def add_cli(sub) -> None:
    p = sub.add_parser("bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench", metavar="<bench>", required=True)
    e = bsub.add_parser("extract", help="extraction images/s vs the forward pass alone")
    e.add_argument("--model", default="open_clip:ViT-B-16")
    e.add_argument("--dataset", help=f"FORMAT:ROOT (default imagenet-sample:{DEFAULT_IMAGES})")
    e.add_argument("--layers", type=int, nargs="+", default=[-2])
    e.add_argument("--images", type=positive_int, default=64)
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--workers", type=nonneg_int)
    e.add_argument("--image-size", type=positive_int)
    e.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    from visae.precision import PRECISIONS
    e.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the forward pass's, in both timings: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    e.add_argument("--out", default=str(DEFAULT_OUT))
    e.set_defaults(func=cmd_bench_extract)
    lo = bsub.add_parser("loader", help="loader tokens/s vs a plain sequential read")
    lo.add_argument("--store", help="an existing store (default: a synthetic one)")
    lo.add_argument("--batch-size", type=positive_int, default=4096)
    lo.add_argument("--images", type=positive_int, default=2048)
    lo.add_argument("--d-model", type=positive_int, default=384)
    lo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    lo.add_argument("--workers", type=positive_int, help="gathering threads (default: the loader's own)")
    lo.add_argument("--device", type=device_arg, default="cpu", help="where the batches land (cuda: pinned, non-blocking)")
    lo.add_argument("--out", default=str(DEFAULT_OUT))
    lo.set_defaults(func=cmd_bench_loader)
    t = bsub.add_parser("train", help="SAE training step FLOP/s vs torch.matmul, TopK speed-up, loader")
    cpu, gpu = SHAPES["cpu"], SHAPES["cuda"]
    for flag, key in (("--d", "d"), ("--expansion", "expansion"), ("--batch", "batch"), ("--k", "k")):
        t.add_argument(flag, type=positive_int, help=f"default {cpu[key]} on CPU, {gpu[key]} on CUDA")
    t.add_argument("--threads", type=positive_int, help="torch threads (default 2 on CPU, torch's own on CUDA)")
    t.add_argument("--precision", default="auto", choices=TRAIN_PRECISIONS,
                   help="the step's matmuls: fp32, tf32 (CUDA) or bf16 autocast (auto: bf16 on CUDA, fp32 on CPU)")
    t.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--out", default=str(DEFAULT_OUT))
    t.set_defaults(func=cmd_bench_train)
    c = bsub.add_parser("compare", help="latent matching's time and peak memory vs its matrix products alone")
    c.add_argument("--images", type=positive_int, default=50_000)
    c.add_argument("--latents", type=positive_int, default=24_576, help="per SAE")
    c.add_argument("--top-k", type=positive_int, default=128, help="candidates kept per latent")
    c.add_argument("--block", type=positive_int, default=1024, help="A latents per block")
    c.add_argument("--chunk", type=positive_int, default=2048, help="images per dense chunk")
    c.add_argument("--sample", type=positive_int, default=3, help="timed products per distinct shape")
    c.add_argument("--threads", type=positive_int, default=2)
    c.add_argument("--seed", type=nonneg_int, default=0)
    c.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--out", default=str(DEFAULT_OUT))
    c.set_defaults(func=cmd_bench_compare)
    i = bsub.add_parser("intervene", help="edited forward passes/s (a LatentEdit at one block) vs plain ones")
    i.add_argument("--source", default="open_clip", help="the model's registry source (open_clip, timm)")
    i.add_argument("--arch", default="ViT-B-16", help="random-init architecture of that source")
    i.add_argument("--image-size", type=positive_int, default=224)
    i.add_argument("--model-kwargs", type=lambda text: json_object(text, "--model-kwargs"), default=None, metavar="JSON",
                   help="timm model_kwargs, e.g. the demo's '{\"patch_size\": 4, \"depth\": 4}'")
    i.add_argument("--layer", type=int, default=-2, help="the block edited")
    i.add_argument("--architecture", default="relu", choices=["relu", "topk", "batchtopk", "jumprelu", "matryoshka"])
    i.add_argument("--expansion", type=positive_int, default=32)
    i.add_argument("--k", type=positive_int, help="active latents (topk, batchtopk, matryoshka)")
    i.add_argument("--batch", type=positive_int, default=8)
    i.add_argument("--rounds", type=positive_int, default=5)
    i.add_argument("--passes", type=positive_int, help="forward passes per timed round (default: about 0.1 s)")
    i.add_argument("--threads", type=positive_int, default=2)
    i.add_argument("--seed", type=nonneg_int, default=0)
    i.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    i.add_argument("--out", default=str(DEFAULT_OUT))
    i.set_defaults(func=cmd_bench_intervene)


def cmd_bench_extract(a) -> int:
    bench_extract(a.model, a.dataset, a.layers, a.images, a.batch_size, a.workers, a.device, a.image_size,
                  Path(a.out), a.precision)
    return 0


def cmd_bench_loader(a) -> int:
    bench_loader(a.store, a.batch_size, a.images, d_model=a.d_model, dtype=a.dtype, workers=a.workers,
                 device=a.device, out_dir=Path(a.out))
    return 0


def cmd_bench_train(a) -> int:
    from visae.tools.bench_train import bench_train
    result = bench_train(d=a.d, expansion=a.expansion, batch=a.batch, k=a.k, threads=a.threads,
                         device=a.device, precision=a.precision)
    result.pop("passed", None)
    _report(result, Path(a.out))
    return 0


def cmd_bench_compare(a) -> int:
    from visae.tools.bench_compare import bench_compare
    _report(bench_compare(a.images, a.latents, top_k=a.top_k, block=a.block, chunk=a.chunk, threads=a.threads,
                          sample=a.sample, seed=a.seed, device=a.device), Path(a.out))
    return 0


def cmd_bench_intervene(a) -> int:
    from visae.tools.bench_intervene import bench_intervene
    _report(bench_intervene(a.source, a.arch, a.image_size, a.model_kwargs, a.layer, a.architecture, a.expansion,
                            a.k, a.batch, a.rounds, a.passes, a.threads, a.device, a.seed), Path(a.out))
    return 0

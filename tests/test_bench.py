"""`visae bench extract|loader|train|compare` at a tiny size (seconds): each prints and writes the JSON
object DESIGN.md promises (`bench`, `device`, `params`, `ratios`, `goals`, raw figures), under
`--out` and nowhere else, and every ratio is the quotient of the raw figures it claims.
Timings themselves are noise here; the arithmetic that turns them into ratios is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median_high

import pytest
import torch

from visae import cli
from visae.errors import VisaeError
from visae.tools import bench

pytestmark = pytest.mark.usefixtures("one_thread")  # `bench train --threads` sets torch's count

REPO = Path(__file__).resolve().parents[1]
KEYS = {"bench", "device", "params", "ratios", "goals", "meets_goals", "packages"}


def run_bench(argv: list[str], out: Path, capsys) -> dict:
    """`visae bench ...` through the CLI: the printed object, checked equal to the written file."""
    assert cli.main(["bench", *argv, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [f"{argv[0]}.json"]
    written = json.loads((out / f"{argv[0]}.json").read_text())
    assert written == printed
    assert KEYS <= set(written) and written["bench"] == argv[0]
    assert {"cuda", "torch_threads"} <= set(written["device"]) and "torch" in written["packages"]
    assert set(written["ratios"]) == set(written["goals"]) == set(written["meets_goals"])
    for name, ratio in written["ratios"].items():
        assert ratio > 0 and written["meets_goals"][name] == (ratio >= written["goals"][name])
    return written


def test_extract(tmp_path, capsys, fashion_mnist_dir, monkeypatch):
    from visae.models.backbone import Backbone
    autocast = []  # each forward pass's autocast dtype (None: none), the reference's and the extraction's
    record = Backbone.record
    monkeypatch.setattr(Backbone, "record", lambda self, px, layers: autocast.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None) or record(self, px, layers))
    r = run_bench(["extract", "--model", "timm:vit_tiny_patch16_224", "--image-size", "32", "--dataset",
                   f"fashion-mnist:{fashion_mnist_dir}", "--layers", "-2", "--images", "8", "--batch-size", "4",
                   "--workers", "0", "--device", "cpu", "--precision", "bf16"], tmp_path / "bench", capsys)
    p = r["params"]
    assert (p["images"], p["batch_size"], p["layers"], p["image_size"]) == (8, 4, [10], [32, 32])
    assert (p["precision"], p["workers"]) == ("bf16", 0)
    assert autocast == [torch.bfloat16] * 8  # warm-up, before, extraction, after: 2 batches each
    assert r["goals"] == {"extract_vs_forward": 0.8}
    runs = r["forward_images_per_s_runs"]
    assert len(runs) == 2 and r["forward_images_per_s"] == (runs[0] + runs[1]) / 2
    assert r["ratios"]["extract_vs_forward"] == r["extract_images_per_s"] / r["forward_images_per_s"]


def test_extract_precision_is_checked(tmp_path, capsys):
    assert cli.main(["bench", "extract", "--precision", "bf32", "--out", str(tmp_path / "bench")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision invalid choice: 'bf32'" in err[0], err
    assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize("given", [False, True], ids=["synthetic", "existing-store"])
def test_loader(tmp_path, capsys, given):
    argv = ["loader", "--batch-size", "16", "--d-model", "8", "--dtype", "float32"]
    if given:
        from visae.tools.synth import synth_store
        argv += ["--store", str(synth_store(tmp_path / "store", d=8, atoms=8, k=2, images=12, tokens_per_image=4,
                                            shard_images=5))]
    else:
        argv += ["--images", "16"]
    r = run_bench(argv, tmp_path / "bench", capsys)
    p = r["params"]
    assert p["store"] == (str(tmp_path / "store") if given else "synthetic")
    assert (p["n_tokens"], p["d_model"], p["batch_size"]) == ((12 * 4, 8, 16) if given else (16 * 196, 8, 16))
    assert r["goals"] == {"loader_vs_sequential_read": 0.8}
    assert r["ratios"]["loader_vs_sequential_read"] == r["loader_tokens_per_s"] / r["sequential_read_tokens_per_s"]
    assert p["device"] == "cpu" and p["workers"] >= 2


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_train(tmp_path, capsys, precision):
    r = run_bench(["train", "--d", "16", "--expansion", "2", "--batch", "64", "--k", "4", "--threads", "1",
                   "--device", "cpu", "--precision", precision], tmp_path / "bench", capsys)
    p = r["params"]
    assert (p["d"], p["width"], p["batch"], p["k"], p["threads"]) == (16, 32, 64, 4, 1)
    # auto is fp32 on CPU; bf16 runs the step under CPU autocast against a bf16 matmul reference
    assert (p["precision"], p["matmul_dtype"]) == {"auto": ("fp32", "float32"), "bf16": ("bf16", "bfloat16")}[precision]
    assert p["flop_per_token"] == 12 * 16 * 32
    assert r["goals"] == {"relu_flops": 0.8, "topk_speedup": 2.0, "loader": 0.9} and "passed" not in r
    rounds = r["round_s"]
    assert set(rounds) == {"matmul", "relu", "topk"} and len({len(v) for v in rounds.values()}) == 1
    assert len(rounds["matmul"]) >= 5
    # The headline ratios: medians of per-round ratios of times taken back to back.
    assert r["ratios"]["relu_flops"] == median_high([m / s for m, s in zip(rounds["matmul"], rounds["relu"])])
    assert r["ratios"]["topk_speedup"] == median_high([s / t for s, t in zip(rounds["relu"], rounds["topk"])])
    # The best-of figures: the fastest round of each.
    assert (r["matmul_s"], r["relu_step_s"], r["topk_step_s"]) == tuple(min(rounds[k]) for k in ("matmul", "relu", "topk"))
    flop_step = p["flop_per_token"] * p["batch"]
    assert r["matmul_flops"] == pytest.approx(flop_step / r["matmul_s"], rel=1e-12)
    assert r["relu_flops_achieved"] == pytest.approx(flop_step / r["relu_step_s"], rel=1e-12)
    assert r["relu_flops_best_of"] == pytest.approx(r["relu_flops_achieved"] / r["matmul_flops"], rel=1e-12)
    assert r["relu_flops_actual"] == pytest.approx(r["ratios"]["relu_flops"] * 10 / 12, rel=1e-12)
    tps = r["tokens_per_s"]
    assert tps["relu"] == pytest.approx(p["batch"] / r["relu_step_s"], rel=1e-12)
    assert tps["topk"] == pytest.approx(p["batch"] / r["topk_step_s"], rel=1e-12)
    assert r["topk_speedup_best_of"] == pytest.approx(tps["topk"] / tps["relu"], rel=1e-12)
    loader = r["loader_tokens_per_s"]
    assert r["ratios"]["loader"] == pytest.approx(loader["store"] / loader["memory"], rel=1e-12)
    # Not goals on CPU: the loader alone over the fastest step, and ReLU over saev's logged rate.
    other = r["informative_ratios"]
    assert set(other) == {"loader_feed", "relu_tokens_per_s_vs_saev"} and p["feed_batches"] == 4 * p["loader_batches"]
    assert other["loader_feed"] == pytest.approx(r["loader_feed_tokens_per_s"] / tps["topk"], rel=1e-12)
    assert other["relu_tokens_per_s_vs_saev"] == pytest.approx(tps["relu"] / 42_000, rel=1e-12)


def test_train_defaults_follow_the_device():
    """No shapes given: the CPU reference sizes on CPU, the paper's ViT-B/16 grid on CUDA (with
    bf16 and the CUDA goals); a shape given is kept on either."""
    from visae.tools import bench_train as bt
    assert bt.resolve_shapes("cpu") == {"d": 384, "expansion": 16, "batch": 4096, "k": 32}
    assert bt.resolve_shapes("cuda:0") == {"d": 768, "expansion": 32, "batch": 16384, "k": 32}
    assert bt.resolve_shapes("cuda", d=512, k=None)["d"] == 512 and bt.resolve_shapes("cuda", k=None)["k"] == 32
    assert bt.PRECISIONS == ("auto", "fp32", "tf32", "bf16")  # training's: no fp16
    assert bt.CUDA_GOALS == {"relu_flops": 0.5, "topk_speedup": 2.0, "loader_feed": 2.0}
    args = cli.build_parser("bench").parse_args(["bench", "train", "--device", "cpu"])
    assert (args.d, args.expansion, args.batch, args.k, args.threads, args.precision) == (None,) * 5 + ("auto",)
    with pytest.raises(VisaeError, match="--precision.*'fp16'"):
        cli.build_parser("bench").parse_args(["bench", "train", "--precision", "fp16"])


def test_default_images_are_found_from_the_repo_root():
    assert bench.REPO_ROOT == REPO and (bench.REPO_ROOT / "Snakefile").is_file()
    assert bench.DEFAULT_IMAGES == REPO.parent / "shared" / "data" / "imagenet-sample"


def test_compare(tmp_path, capsys):
    from visae.analysis.matching import working_memory_bytes
    r = run_bench(["compare", "--images", "600", "--latents", "160", "--block", "64", "--chunk", "256",
                   "--sample", "1", "--threads", "1", "--device", "cpu"], tmp_path / "bench", capsys)
    p = r["params"]
    assert (p["images"], p["latents"], p["block"], p["chunk"], p["top_k"], p["threads"]) == (600, 160, 64, 256, 128, 1)
    assert r["goals"] == {"products_vs_pipeline": 0.8, "memory_bound_vs_peak": 1.0}
    assert r["products_count"] == 3 * 3   # ceil(160 / 64) blocks x ceil(600 / 256) chunks
    assert sum(s["count"] for s in r["products_alone_shapes"]) == r["products_count"]
    assert r["pipeline_s"] == r["correlations_s"] + r["assign_s"]
    assert r["ratios"]["products_vs_pipeline"] == r["products_s"] / r["pipeline_s"]
    assert r["products_alone_s"] == sum(r["products_alone_s_runs"]) / 2
    assert r["memory_bound_bytes"] == working_memory_bytes(160, 160, top_k=128, block=64, chunk=256)
    assert r["ratios"]["memory_bound_vs_peak"] == r["memory_bound_bytes"] / max(r["correlations_peak_bytes"], 1)
    assert r["planted_recovered"] > 0.8 and p["planted_pairs"] == 80 and 0 < p["density_a"] < 0.1


def _gpu_script(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("OUT", "VISAE_BENCH_DATASET", "VISAE_GPU_BUDGET")}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), *args], cwd=tmp_path, text=True,
                          capture_output=True, env=environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"} | env)


@pytest.mark.slow
def test_gpu_script_smoke_writes_everything_under_one_folder(tmp_path, fashion_mnist_dir):
    """benchmarks/gpu.sh --cpu-smoke: the device script's steps at tiny sizes on CPU (about 30 s):
    every bench's JSON, each step's log, the CUDA tests' junit XML (skipped here, with their
    reason) and summary.json land in the one folder given, and the summary sets each ratio
    next to its goal."""
    out = tmp_path / "gpu"
    p = _gpu_script(["--cpu-smoke", str(out)], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    benches = {"train": "train", "loader": "loader", "loader-device": "loader", "extract": "extract"}
    assert sorted(f.name for f in out.iterdir()) == sorted(
        [f"{s}.{ext}" for s in benches for ext in ("json", "log")]
        + ["pytest-cuda.log", "pytest-cuda.xml", "steps.tsv", "summary.json"])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["pytest-cuda", *benches] and {s["status"] for s in summary.values()} == {"ok"}
    for step, name in benches.items():
        result = json.loads((out / f"{step}.json").read_text())
        assert result["bench"] == name and result["params"].get("device", "cpu") == "cpu"
        assert {k: r["ratio"] for k, r in summary[step]["ratios"].items()} == result["ratios"]
        for k, ratio in result["ratios"].items():
            assert f"{k:28s} {ratio:9.3f}  goal >= {result['goals'][k]:<5g}" in p.stdout
    tests = summary["pytest-cuda"]["tests"]
    assert tests["tests"] >= 5 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]
        assert "needs a CUDA GPU: torch.cuda.is_available() is False" in (out / "pytest-cuda.log").read_text()


def test_gpu_script_stops_at_its_budget_and_says_so(tmp_path):
    """No step starts without the time to finish: each is recorded as skipped, the script exits
    non-zero, and the summary still comes."""
    p = _gpu_script(["--cpu-smoke", str(tmp_path / "gpu")], tmp_path, VISAE_GPU_BUDGET="12")
    assert p.returncode == 1
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert list(summary) == ["pytest-cuda", "train", "loader", "loader-device", "extract"]
    assert all(s["status"] == "skipped" and s["why"] == "no time left in the 12s budget" for s in summary.values())
    assert "train           skipped" in p.stdout

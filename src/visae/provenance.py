"""provenance.json: what produced a result directory (code, config, packages, device, seeds)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import time
from pathlib import Path


PACKAGES = ["visae", "torch", "torchvision", "timm", "open_clip_torch", "numpy", "safetensors"]


def package_versions(names: list[str] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_state(cwd: Path | None = None) -> dict:
    """Git SHA and dirty flag of the code, or nulls outside a checkout."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=cwd, capture_output=True, text=True, check=True).stdout.strip())
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


def count_gpus() -> int:
    """GPUs this process may use, without importing CUDA: CUDA_VISIBLE_DEVICES, else /dev/nvidiaN.
    The workflow caps its `gpu` resource at this, one GPU job per card."""
    import glob
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def device_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def provenance(config: dict, seeds: dict | None = None, started: float | None = None) -> dict:
    return {
        "git": git_state(),
        "config_hash": config_hash(config),
        "config": config,
        "packages": package_versions(),
        "device": device_info(),
        "seeds": seeds or {},
        "wall_time_s": None if started is None else round(time.time() - started, 3),
    }

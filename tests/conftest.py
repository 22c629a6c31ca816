"""Shared fixtures: real data locations, skipping with a reason when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VISAE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
FASHION_MNIST_DEB = Path("/usr/share/datasets/fashion-mnist")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread, then restore the count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real image set {path} is absent (it ships beside the repo as ../shared/data)")
    return path


@pytest.fixture
def cifar10_dir() -> Path:
    return _shared("cifar10-test")


@pytest.fixture
def camvid_dir() -> Path:
    return _shared("camvid")


@pytest.fixture
def imagenet_sample_dir() -> Path:
    return _shared("imagenet-sample")


@pytest.fixture
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST_DEB / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is absent: apt-get install -y dataset-fashion-mnist")
    return FASHION_MNIST_DEB

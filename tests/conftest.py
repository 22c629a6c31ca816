"""Shared fixtures: real data locations, skipping with a reason when absent; a small trained SAE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VISAE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
FASHION_MNIST_DEB = Path("/usr/share/datasets/fashion-mnist")

torch.set_num_threads(min(2, os.cpu_count() or 1))


SYNTH_IMAGES, SYNTH_CLASSES, SYNTH_HELDOUT = 160, 4, 0.5


@pytest.fixture(scope="session")
def synth_sae(tmp_path_factory):
    """(store, SAE folder): a ReLU SAE trained on a `visae synth` store of 160 images of 4 classes
    (image i has label i % 4), half of them held out; the latent index and comparison tests use it."""
    import yaml

    from visae.cli import main
    from visae.tools.synth import synth_store

    root = tmp_path_factory.mktemp("synth_sae")
    store = synth_store(root / "store", d=16, atoms=32, k=3, images=SYNTH_IMAGES, tokens_per_image=16,
                        shard_images=70, classes=SYNTH_CLASSES)
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"name": "relu", "architecture": "relu", "l1": 1e-2, "expansion": 4,
                                     "lr": 3e-3, "lr_warmup": 5, "batch_size": 64}]))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--store", str(store), "--grid", str(grid), "--out", str(root / "saes"),
                     "--tokens", "4000", "--heldout", str(SYNTH_HELDOUT)]) == 0
    finally:
        torch.set_num_threads(old)
    return store, root / "saes" / "relu"


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


@pytest.fixture(scope="session")
def pretrain_checkpoint():
    """`write(directory, spec, init_seed)`: a `visae pretrain`-style checkpoint (model.safetensors and
    config.json) of a random-init timm ViT of `spec`; returns the weights file."""
    import json

    from safetensors.torch import save_file

    from visae.models import load_backbone

    def write(directory: Path, spec: dict, init_seed: int) -> Path:
        directory.mkdir(parents=True)
        model = load_backbone(spec | {"init_seed": init_seed}).model
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({"model_spec": {k: spec[k] for k in
                                                                           ("arch", "image_size", "model_kwargs")}}))
        return directory / "model.safetensors"

    return write


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    """A copy of the project (as a fresh clone, with the workflow's test config) that has run the
    full DAG once: the workflow tests read and change it, the SLURM test compares against it."""
    from test_workflow import copy_project, run, tiny_config

    if not (FASHION_MNIST_DEB / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is absent: apt-get install -y dataset-fashion-mnist")
    root = copy_project(tmp_path_factory.mktemp("project"), tiny_config())
    run(root, "snakemake", "--cores", "2")
    return root

"""`visae synth` ground truth: the store is valid, and TopK and ReLU-L1 SAEs trained on it
recover the planted dictionary (mean best cosine >= 0.9; Hungarian 1-to-1 score reported)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from visae.cli import main
from visae.sae import load
from visae.store import ActivationStore
from visae.tools.synth import load_atoms, recovery


# Tiny matmuls: one thread avoids OpenMP hand-off costs on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_synth_store_is_valid_and_resumable(tmp_path):
    args = ["synth", "--out", str(tmp_path / "s"), "--d", "8", "--atoms", "20", "--k", "2", "--images", "10",
            "--tokens-per-image", "4", "--seed", "3"]
    assert main(args) == 0
    store = ActivationStore(tmp_path / "s")
    assert store.verify() == [] and store.d_model == 8 and store.n_tokens == 40
    atoms = load_atoms(tmp_path / "s")
    assert atoms.shape == (20, 8) and np.allclose(np.linalg.norm(atoms, axis=1), 1, atol=1e-6)
    first = (tmp_path / "s" / "acts_00000.npy").read_bytes()
    assert main(args) == 0  # a rerun keeps the verified shards and gives the same bytes
    assert (tmp_path / "s" / "acts_00000.npy").read_bytes() == first
    assert main(["synth", "--out", str(tmp_path / "t"), "--atoms", "3", "--k", "4"]) == 1


def test_recovery_score_is_one_for_the_atoms_themselves():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 6))
    r = recovery(a, np.concatenate([a[::-1] * 2.0, rng.normal(size=(5, 6))]))
    assert r["mean_best_cos"] == pytest.approx(1.0) and r["hungarian_mean_cos"] == pytest.approx(1.0)


def test_sae_recovers_planted_atoms(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["synth", "--out", str(store), "--d", "64", "--atoms", "256", "--k", "4", "--images", "1024",
                 "--noise", "0.01", "--seed", "0"]) == 0
    grid = tmp_path / "grid.yaml"
    common = {"expansion": 4, "lr_warmup": 50, "batch_size": 512, "seed": 0}
    grid.write_text(yaml.safe_dump([
        {"name": "topk", "architecture": "topk", "k": 4, "lr": 4e-3, "dead_tokens": 20000,
         "tokens": 512 * 600, **common},
        {"name": "relu", "architecture": "relu", "l1": 2e-2, "lr": 1e-2, "l1_warmup": 200,
         "tokens": 512 * 1500, **common},
    ]))
    assert main(["train", "--store", str(store), "--grid", str(grid), "--out", str(tmp_path / "saes")]) == 0
    atoms = load_atoms(store)
    scores = {}
    for name in ("topk", "relu"):
        sae = load(tmp_path / "saes" / name)
        scores[name] = recovery(atoms, sae.W_dec.detach().numpy())
        assert main(["evaluate", "--store", str(store), "--sae", str(tmp_path / "saes" / name),
                     "--out", str(tmp_path / "ev" / name)]) == 0
        scores[name]["nmse"] = json.loads((tmp_path / "ev" / name / "metrics.json").read_text())["nmse"]
    with capsys.disabled():
        print(f"\nground-truth recovery: {json.dumps(scores, indent=1)}")
    for name, s in scores.items():
        assert s["mean_best_cos"] >= 0.9, (name, s)
        assert s["hungarian_mean_cos"] >= 0.85, (name, s)

"""`visae pretrain --model ENTRY_JSON`: the workflow's way in gives the very bytes the flags give."""

from __future__ import annotations

import json

import pytest

from visae import cli

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRY = {"name": "tiny", "source": "pretrain", "arch": "vit_tiny_patch16_224", "image_size": 28, "init_seed": 0,
         "model_kwargs": {"patch_size": 7, "depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
         "pretrain": {"objective": "supervised", "dataset": "fmnist-train", "seed": 3, "steps": 2,
                      "batch_size": 16, "max_images": 64, "eval_train": 32, "eval_test": 32}}
FLAGS = ["--objective", "supervised", "--arch", "vit_tiny_patch16_224", "--image-size", "28", "--patch-size", "7",
         "--depth", "1", "--embed-dim", "32", "--heads", "2", "--mlp-ratio", "2", "--seed", "3", "--steps", "2",
         "--batch-size", "16", "--max-images", "64", "--eval-train", "32", "--eval-test", "32"]


def test_entry_json_gives_the_same_outputs_as_flags(tmp_path, fashion_mnist_dir):
    common = ["--data", str(fashion_mnist_dir), "--no-baseline", "--quiet", "--threads", "1"]
    assert cli.main(["pretrain", *FLAGS, *common, "--out", str(tmp_path / "flags")]) == 0
    assert cli.main(["pretrain", "--model", json.dumps(ENTRY), *common, "--out", str(tmp_path / "entry")]) == 0
    for name in ("model.safetensors", "log.csv"):
        assert (tmp_path / "flags" / name).read_bytes() == (tmp_path / "entry" / name).read_bytes(), name
    configs = [_settings(tmp_path / run / "config.json") for run in ("flags", "entry")]
    assert configs[0] == configs[1] and '"mlp_ratio": 2.0' in configs[0]


def _settings(path):
    """config.json's text without what differs between any two runs: timings and the output path."""
    config = json.loads(path.read_text())
    for key in ("train_images_per_s", "train_time_s"):
        del config["metrics"][key]
    del config["wall_time_s"], config["model_spec"]["weights"]
    return json.dumps(config, sort_keys=True)


def test_entry_without_mlp_ratio_uses_timms_default(tmp_path, fashion_mnist_dir):
    entry = json.loads(json.dumps(ENTRY))
    del entry["model_kwargs"]["mlp_ratio"]
    assert cli.main(["pretrain", "--model", json.dumps(entry), "--data", str(fashion_mnist_dir), "--no-baseline",
                     "--quiet", "--out", str(tmp_path / "o")]) == 0
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["model_kwargs"]["mlp_ratio"] == 4.0


@pytest.mark.parametrize("model, message", [
    ("{not json", "--model is not valid JSON"),
    (json.dumps({"name": "x", "arch": "vit_tiny_patch16_224"}), "--model must be a models: entry"),
    (json.dumps({**ENTRY, "pretrain": {**ENTRY["pretrain"], "steps": "many"}}),
     "models.tiny.pretrain.steps: 'many' is not int"),
])
def test_bad_entry_is_one_line(tmp_path, capsys, model, message):
    assert cli.main(["pretrain", "--model", model, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visae: error: ") and message in err[0], err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_missing_data_names_its_config_key(tmp_path, capsys):
    """At run time too, the pretraining data's error names the config key it came from."""
    entry = json.dumps({"name": "vit-s", "source": "pretrain", "arch": "vit_tiny_patch16_224",
                        "pretrain": {"dataset": "fmnist-train", "objective": "supervised"}})
    assert cli.main(["pretrain", "--model", entry, "--data", str(tmp_path / "gone"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visae: error: datasets.fmnist-train: "), err
    assert str(tmp_path / "gone") in err[0]
    assert not (tmp_path / "o" / "model.safetensors").exists()

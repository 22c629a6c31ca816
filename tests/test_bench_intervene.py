"""`visae bench intervene` on a tiny timm ViT (seconds): the JSON object every bench writes, under
`--out` only, and a ratio that is the median of the per-round ratios it reports. Timings are noise
here; the structure and the arithmetic are not."""

from __future__ import annotations

import json
from statistics import median_high

import pytest

from visae import cli

pytestmark = pytest.mark.usefixtures("one_thread")  # `--threads` sets torch's count

TINY = ["--source", "timm", "--arch", "vit_tiny_patch16_224", "--image-size", "28", "--model-kwargs",
        json.dumps({"patch_size": 4, "depth": 3, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2}), "--layer", "1"]


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_bench_intervene_on_a_tiny_vit(tmp_path, capsys, architecture):
    out = tmp_path / "bench"
    argv = ["bench", "intervene", *TINY, "--architecture", architecture, "--expansion", "4", "--k", "4",
            "--batch", "2", "--rounds", "3", "--passes", "2", "--threads", "1", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p.name for p in out.iterdir()] == ["intervene.json"]
    r = json.loads((out / "intervene.json").read_text())
    assert r == printed and r["bench"] == "intervene"
    assert {"device", "params", "ratios", "goals", "meets_goals", "packages", "passes_per_s", "images_per_s",
            "round_s", "edited_vs_plain_best_of", "edit_max_abs_change"} <= set(r)
    p = r["params"]
    assert (p["d_model"], p["width"], p["block"], p["n_tokens"], p["batch"]) == (32, 128, 1, 50, 2)
    assert (p["architecture"], p["k"], p["rounds"], p["passes_per_round"], p["threads"]) == (architecture, 4, 3, 2, 1)
    assert 0 <= p["latent"] < 128 and p["image_size"] == [28, 28]
    assert r["goals"] == {"edited_vs_plain": 0.75}
    rounds = r["round_s"]
    assert set(rounds) == {"plain", "edited"} and len(rounds["plain"]) == len(rounds["edited"]) == 3
    ratio = r["ratios"]["edited_vs_plain"]
    assert ratio > 0 and ratio == median_high([a / b for a, b in zip(rounds["plain"], rounds["edited"])])
    assert r["meets_goals"]["edited_vs_plain"] == (ratio >= 0.75)
    assert r["passes_per_s"]["plain"] == pytest.approx(2 / min(rounds["plain"]), rel=1e-12)
    assert r["images_per_s"]["edited"] == pytest.approx(2 * r["passes_per_s"]["edited"], rel=1e-12)
    assert r["edit_max_abs_change"] > 0  # the edit changed the final tokens: the timed pass is a real edit


def test_bad_model_kwargs_are_one_line(tmp_path, capsys):
    assert cli.main(["bench", "intervene", "--model-kwargs", "[1]", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model-kwargs must be a JSON object" in err[0]

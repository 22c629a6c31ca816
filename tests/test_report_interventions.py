"""`visae report interventions` on hand-written intervention folders, exact to the spec `visae
intervene` writes (both tasks, two models, two SAEs on one of them): the tables hold the numbers
written, as mean ± std; the figures are valid, deterministic PNG/PDF under Layout's names; a folder
with a file or key missing is refused in one line."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from visae.cli import main
from visae.layout import Layout

CLASSES = ["shirt", "bag", "boot"]
SCALES = [-2.0, -1.0, 0.0, 1.0]
METHODS = {"classification": ["latent", "random_latent", "random_direction", "probe_direction"],
           "segmentation": ["latent", "random_latent", "random_direction"]}
CLASSES_COLUMNS = {
    "classification": "class,class_name,method,latent,n_images,p_before,p_after,delta_prob,acc_before,acc_after,"
                      "delta_acc,other_acc_before,other_acc_after,other_delta_acc,flip_rate",
    "segmentation": "class,class_name,method,latent,f1,threshold,n_target_patches,target_change,other_change,"
                    "miou_after"}
DOSE_STEMS = {"classification": ("delta_prob", "delta_acc"), "segmentation": ("target_change", "other_change")}


def _stat(mean, std):
    return {"mean": mean, "std": std}


def _summary(task: str, model: str, sae: str, seed: int) -> dict:
    """An intervention.json with every key of the spec; numbers derived from `seed`, so each differs."""
    methods = METHODS[task]
    base = seed / 100
    summary = {
        "task": task, "model": model, "dataset": "mosaic-test", "layer": 2, "sae": sae, "sae_sha256": "ab" * 32,
        "identity": {"model": model, "dataset": "fmnist-test", "layer": 2, "sae": sae, "store_hash": "cd" * 32},
        "index": "latents/x", "probe": {"dir": "probes/x", "metric": "top1" if task == "classification" else "miou",
                                        "test_score": 0.8 + base, "random_init_score": 0.3 + base},
        "methods": methods, "n_classes": len(CLASSES), "n_images": 12, "scales": SCALES, "config": {"seed": 0},
        "provenance": {"git": {}},
        "finding": {"moves_more_than_baselines": seed % 2 == 0, "text": f"The latents move their targets ({seed})."},
    }
    if task == "classification":
        summary |= {"suppress_scale": 0.0, "insert_scale": 1.0, "tokens": "patches", "accuracy_before": 0.81 + base,
                    "suppression": {m: {"delta_prob": _stat(-0.5 + i / 10 + base, 0.05 + i / 100),
                                        "delta_acc": _stat(-0.4 + i / 10, 0.1),
                                        "other_delta_acc": _stat(-0.01 * i, None if i == 1 else 0.02)}
                                    for i, m in enumerate(methods)},
                    "insertion": {m: {"flip_rate": _stat(0.6 - i / 10, 0.2)} for i, m in enumerate(methods)
                                  if m != "probe_direction"}}
    else:
        summary |= {"scale": -2.0, "thresholds": [0, 0.1, 0.3, 1.0], "mode": "auto", "miou_before": 0.55 + base,
                    "rates": {m: {"target_change": _stat(0.7 - i / 5 + base, 0.1),
                                  "other_change": _stat(0.05 + i / 50, 0.01),
                                  "miou_after": _stat(0.4, 0.05)} for i, m in enumerate(methods)}}
    return summary


def write_intervention(root: Path, task: str, model: str, sae: str, seed: int) -> Path:
    """A folder as `visae intervene` writes it, at Layout's path; returns its intervention.json."""
    layout = Layout(root)
    folder = Path(layout.intervention(task, model, "mosaic-test", 2, sae))
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    methods = METHODS[task]
    with open(folder / "classes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        columns = CLASSES_COLUMNS[task].split(",")
        w.writerow(columns)
        for c, name in enumerate(CLASSES):
            for m in methods:
                w.writerow([c, name, m, "" if m == "random_direction" else 7 + c] +
                           [f"{v:.4f}" for v in rng.random(len(columns) - 4)])
    with open(folder / "dose.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        a, b = DOSE_STEMS[task]
        w.writerow(["method", "scale", f"{a}_mean", f"{a}_std", f"{b}_mean", f"{b}_std"])
        for i, m in enumerate(methods):
            for s in SCALES:
                w.writerow([m, s, -0.2 * (i + 1) * (1 - s), 0.05, 0.01 * s, 0.02])
    n, side, grid = 2, 16, 4
    arrays = {"image": rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
              "heatmap": rng.random((n, grid, grid), dtype=np.float32),
              "class": np.array([0, 2], dtype=np.int64), "latent": np.array([7, 9], dtype=np.int64)}
    if task == "classification":
        before = rng.dirichlet(np.ones(len(CLASSES)), n).astype(np.float32)
        arrays |= {"probs_before": before, "probs_after": before[:, ::-1].copy()}
    else:
        pred = rng.integers(0, len(CLASSES), (n, side, side), dtype=np.int64)
        arrays |= {"pred_before": pred, "pred_after": np.roll(pred, 1, axis=1)}
    save_file(arrays, str(folder / "examples.safetensors"), metadata={"classes": json.dumps(CLASSES), "task": task})
    (folder / "intervention.json").write_text(json.dumps(_summary(task, model, sae, seed), indent=2))
    return folder / "intervention.json"


def _folders(root: Path) -> list[Path]:
    return [write_intervention(root, task, model, sae, seed) for seed, (task, model, sae) in enumerate([
        ("classification", "vit-a", "topk-16"), ("classification", "vit-a", "relu-1"),
        ("classification", "vit-b", "topk-16"), ("segmentation", "vit-a", "topk-16"),
        ("segmentation", "vit-b", "topk-16")])]


def _report(folders, out: Path) -> tuple[Path, Path]:
    tables, figures = out / "tables", out / "figures"
    assert main(["report", "interventions", "--results", *map(str, folders), "--tables", str(tables),
                 "--figures", str(figures)]) == 0
    return tables, figures


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """The report run twice on the same folders: (folders, [(tables, figures) of each run], stdout of the first)."""
    root = tmp_path_factory.mktemp("interventions")
    folders = _folders(root / "results")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runs = [_report(folders, root / f"run{i}") for i in range(2)]
    return folders, runs, printed.getvalue()


def test_tables_hold_the_numbers_written(reported):
    tables = reported[1][0][0]
    assert reported[2].splitlines() == [f"5 intervention(s) -> 24 table/figure file(s) in {t}, {f}"
                                        for t, f in reported[1]]
    assert sorted(p.name for p in tables.iterdir()) == sorted(f"{t}.{e}" for t in ("classification", "segmentation")
                                                              for e in ("md", "csv", "tex", "json"))
    df = pd.read_csv(tables / "classification.csv")
    # one row per folder, sorted by (model, dataset, layer, SAE)
    assert list(zip(df.model, df.sae)) == [("vit-a", "relu-1"), ("vit-a", "topk-16"), ("vit-b", "topk-16")]
    row = df.iloc[0]  # seed 1
    assert row.probe_score == pytest.approx(0.81) and row.random_init_score == pytest.approx(0.31)
    assert row.latent_delta_prob_mean == pytest.approx(-0.49) and row.latent_delta_prob_std == pytest.approx(0.05)
    assert row.random_latent_other_delta_acc_mean == pytest.approx(-0.01)
    assert np.isnan(row.random_latent_other_delta_acc_std) and np.isnan(row.probe_direction_flip_rate_mean)
    assert row.probe_metric == "top1" and row.sae_dataset == "fmnist-test" and not row.moves_more_than_baselines
    assert row.finding == "The latents move their targets (1)."
    md = (tables / "classification.md").read_text()
    assert md.count("\n") == 2 + 3
    line = next(ln for ln in md.splitlines() if "relu-1" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    cell = dict(zip(header, cells))
    assert cell["latent delta_prob"] == "-0.490 ± 0.050"
    assert cell["random_latent other_delta_acc"] == "-0.010 ± -"
    assert cell["probe_direction flip_rate"] == "-"
    assert (cell["probe"], cell["random init"], cell["acc. before"]) == ("0.810", "0.310", "0.820")
    assert (cell["moves more"], cell["finding"]) == ("False", "The latents move their targets (1).")
    assert header[-2:] == ["moves more", "finding"]
    seg = (tables / "segmentation.md").read_text()
    assert "0.740 ± 0.100" in seg and "mIoU before" in seg and "0.580" in seg  # seed 3's target change, mIoU
    tex = (tables / "segmentation.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "\\toprule" in tex and "random\\_latent target\\_change" in tex
    assert "0.740 $\\pm$ 0.100" in tex
    keyed = json.loads((tables / "segmentation.json").read_text())
    assert sorted(keyed) == ["vit-a/mosaic-test/layer_2/topk-16", "vit-b/mosaic-test/layer_2/topk-16"]
    assert keyed["vit-b/mosaic-test/layer_2/topk-16"]["latent_target_change_mean"] == pytest.approx(0.74)


def test_figures_valid_deterministic_and_provenance_last(reported):
    folders, runs, _ = reported
    runs = [figures for _, figures in runs]
    layout = Layout("results")
    expected = {Path(layout.intervention_figure(kind, task, model, ext)).name
                for kind in ("dose", "example") for task in ("classification", "segmentation")
                for model in ("vit-a", "vit-b") for ext in ("png", "pdf")}
    assert {p.name for p in runs[0].iterdir()} == expected | {"provenance.json"}
    for name in sorted(expected):
        data = (runs[0] / name).read_bytes()
        assert data.startswith(b"\x89PNG" if name.endswith(".png") else b"%PDF") and len(data) > 5000
        assert data == (runs[1] / name).read_bytes(), f"{name} differs between two runs"
    marker = runs[0] / "provenance.json"
    assert all(marker.stat().st_mtime_ns >= (runs[0] / n).stat().st_mtime_ns for n in expected)
    prov = json.loads(marker.read_text())
    assert prov["config"] == {"command": "report interventions", "results": [str(p) for p in folders]}


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visae: error: "), err
    return err[0]


def test_incomplete_folders_are_refused_in_one_line(tmp_path, capsys):
    folders = _folders(tmp_path / "results")
    argv = ["report", "interventions", "--results", *map(str, folders), "--tables", str(tmp_path / "t"),
            "--figures", str(tmp_path / "f")]
    (folders[1].parent / "examples.safetensors").unlink()
    assert "lacks examples.safetensors: rerun `visae intervene`" in _error(capsys, argv)
    summary = json.loads(folders[3].read_text())
    del summary["miou_before"], summary["probe"]["random_init_score"]
    folders[3].write_text(json.dumps(summary))
    assert f"{folders[3]} lacks key(s) miou_before, probe.random_init_score" in _error(capsys, argv[:3] + [
        str(folders[3])] + argv[-4:])
    (folders[0].parent / "examples.safetensors").write_bytes(b"xx")
    assert "is not readable" in _error(capsys, argv[:3] + [str(folders[0])] + argv[-4:])
    assert not (tmp_path / "t").exists() and not (tmp_path / "f").exists()

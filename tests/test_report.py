"""`visae report tables|figures` on real evaluations of SAEs trained on a tiny synthetic store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from visae.cli import main
from visae.errors import VisaeError
from visae.layout import Layout
from visae.report import collect_rows, match_latents
from visae.tools.synth import synth_store

SAES = ["topk", "relu", "btk"]
MODEL, LAYER, PASS = "synthetic", 0, "grid"
COLUMNS = ["model", "dataset", "layer", "sae", "architecture", "width", "k", "lambda", "l0", "mse", "nmse",
           "explained_variance", "dead_fraction", "dense_fraction"]
FIGURE_STEMS = ["frontier", "latent_freq"]


# Tiny matmuls: one thread avoids OpenMP hand-off costs on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _relabel(src: Path, dst: Path, **identity) -> Path:
    """A copy of an evaluation's metrics.json and latents.csv with some identity fields changed."""
    dst.mkdir(parents=True, exist_ok=True)
    m = json.loads((src / "metrics.json").read_text())
    m["identity"].update(identity)
    (dst / "metrics.json").write_text(json.dumps(m))
    df = pd.read_csv(src / "latents.csv", dtype=str)
    for key, value in identity.items():
        df[key] = str(value)
    df.to_csv(dst / "latents.csv", index=False)
    return dst / "metrics.json"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A workflow-shaped results/ tree (paths from visae.layout): three real evaluations, plus a copy of
    one whose files name another model, dataset and layer."""
    root = tmp_path_factory.mktemp("report")
    store = synth_store(root / "store", d=16, atoms=48, k=3, images=60, tokens_per_image=16, shard_images=32)
    dataset = json.loads((store / "meta.json").read_text())["dataset"]
    grid = root / "grid.yaml"
    common = {"expansion": 4, "lr": 3e-3, "lr_warmup": 5, "batch_size": 64}
    grid.write_text(yaml.safe_dump([
        {"name": "topk", "architecture": "topk", "k": 3, **common},
        {"name": "relu", "architecture": "relu", "l1": 3e-2, **common},
        {"name": "btk", "architecture": "batchtopk", "k": 5, **common}]))
    layout = Layout(root / "results")
    assert main(["train", "--store", str(store), "--grid", str(grid), "--out",
                 layout.sae_pass(MODEL, dataset, LAYER, PASS), "--tokens", "1600", "--heldout", "0.2"]) == 0
    for name in SAES:
        assert main(["evaluate", "--store", str(store), "--sae", layout.sae(MODEL, dataset, LAYER, PASS, name),
                     "--out", layout.evaluation(MODEL, dataset, LAYER, name)]) == 0
    metrics = [Path(layout.metrics(MODEL, dataset, LAYER, n)) for n in SAES]
    metrics.append(_relabel(metrics[0].parent, Path(layout.evaluation("other-model", "imgs", 3, "topk")),
                            model="other-model", dataset="imgs", layer=3))
    latents = [p.parent / "latents.csv" for p in metrics]
    logs = [Path(layout.sae_log(MODEL, dataset, LAYER, PASS, n)) for n in SAES]
    return {"root": root, "dataset": dataset, "metrics": metrics, "latents": latents, "logs": logs,
            "saes": Path(layout.sae_pass(MODEL, dataset, LAYER, PASS))}


def _args(paths) -> list[str]:
    return [str(p) for p in paths]


def test_tables_match_metrics(results, tmp_path):
    out = tmp_path / "tables"
    assert main(["report", "tables", "--metrics", *_args(results["metrics"]), "--out", str(out)]) == 0
    for name in ("saes.csv", "saes.md", "saes.tex", "provenance.json"):
        assert (out / name).is_file()
    df = pd.read_csv(out / "saes.csv", keep_default_na=False, na_values=[""])
    assert list(df.columns) == COLUMNS
    assert len(df) == 4
    # sorted by (model, dataset, layer, sae)
    assert list(zip(df["model"], df["sae"])) == [("other-model", "topk"), (MODEL, "btk"), (MODEL, "relu"),
                                                 (MODEL, "topk")]
    assert list(df["dataset"]) == ["imgs"] + [results["dataset"]] * 3
    assert list(df["layer"]) == [3, LAYER, LAYER, LAYER]
    by_key = {(r["model"], r["sae"]): r for r in df.to_dict("records")}
    for path in results["metrics"]:
        m = json.loads(path.read_text())
        model = "other-model" if "other-model" in path.parts else MODEL
        row = by_key[(model, m["sae"])]
        assert row["architecture"] == m["architecture"] and row["width"] == m["width"]
        for key in ("l0", "mse", "nmse", "explained_variance", "dead_fraction", "dense_fraction"):
            assert row[key] == m[key], key  # full precision round-trip
    cfg = {n: json.loads((results["saes"] / n / "config.json").read_text()) for n in SAES}
    assert by_key[(MODEL, "topk")]["k"] == 3 and by_key[(MODEL, "btk")]["k"] == 5
    assert by_key[(MODEL, "relu")]["lambda"] == cfg["relu"]["entry"]["l1"]
    assert pd.isna(by_key[(MODEL, "relu")]["k"]) and pd.isna(by_key[(MODEL, "topk")]["lambda"])
    # the relabelled copy keeps its SAE's entry: k comes from the file
    assert by_key[("other-model", "topk")]["k"] == 3

    md = (out / "saes.md").read_text()
    lines = md.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "model", "dataset", "layer", "SAE", "architecture", "width", "k", "λ", "L0", "MSE", "NMSE", "expl. var.",
        "dead", "dense"]
    assert set(lines[1]) <= set("|:- ") and len(lines) == 2 + 4
    nmse = json.loads(results["metrics"][0].read_text())["nmse"]
    assert f"{nmse:.4g}" in md
    tex = (out / "saes.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"$\lambda$"):
        assert rule in tex
    assert tex.count(r"\\") == 1 + 4
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["metrics"] == _args(results["metrics"]) and "git" in prov

    # a rerun, with the inputs in another order, gives identical bytes
    again = tmp_path / "again"
    assert main(["report", "tables", "--metrics", *_args(results["metrics"][::-1]), "--out", str(again)]) == 0
    for name in ("saes.csv", "saes.md", "saes.tex"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_identity_comes_from_the_files_never_the_path(results, tmp_path):
    good = results["metrics"][0]
    # a path that says another model, dataset, layer and SAE: the file's identity wins
    d = tmp_path / "evaluate" / "m" / "d" / "layer_1" / "x"
    d.mkdir(parents=True)
    shutil.copy(good, d / "metrics.json")
    (row,) = collect_rows([d / "metrics.json"])
    assert (row.model, row.dataset, row.layer, row.sae) == (MODEL, results["dataset"], LAYER, "topk")
    assert row.store_hash == json.loads(good.read_text())["identity"]["store_hash"]
    # the latents file belongs to the metrics of the same identity, wherever it lies
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(good.parent / "latents.csv", elsewhere / "latents.csv")
    freqs = match_latents([row], [elsewhere / "latents.csv"])
    assert list(freqs) == [row.key] and len(freqs[row.key]) == row.width
    # a file without identity is refused, naming itself, even at a path that would have told
    m = json.loads(good.read_text())
    del m["identity"]
    (d / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(VisaeError, match=r"metrics file .*metrics\.json has no 'identity' block"):
        collect_rows([d / "metrics.json"])
    # the training log names itself in its leading columns: moved away from its checkpoint, it still does
    from visae.report import load_log
    moved = tmp_path / "log-elsewhere" / "log.csv"
    moved.parent.mkdir()
    shutil.copy(results["logs"][0], moved)
    ident, df = load_log(moved)
    assert (ident["model"], ident["dataset"], ident["layer"], ident["sae"]) == (MODEL, results["dataset"], LAYER,
                                                                                 SAES[0])
    assert ident["architecture"] in ("relu", "topk") and len(df) > 0


def test_latents_of_another_store_are_refused(results, tmp_path):
    rows = collect_rows(results["metrics"][:1])
    other = _relabel(results["metrics"][0].parent, tmp_path / "o", store_hash="0" * 64)
    with pytest.raises(VisaeError, match="matches none of the --metrics"):
        match_latents(rows, [other.parent / "latents.csv"])


def test_figures_written_and_deterministic(results, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"fig{i}"
        assert main(["report", "figures", "--metrics", *_args(results["metrics"]),
                     "--latents", *_args(results["latents"]), "--logs", *_args(results["logs"]),
                     "--out", str(out)]) == 0
        runs.append(out)
    expected = {f"{stem}_{model}.{ext}" for stem in FIGURE_STEMS for model in (MODEL, "other-model")
                for ext in ("png", "pdf")} | {f"training_{MODEL}.png", f"training_{MODEL}.pdf", "provenance.json",
                                              "frontier_all.png", "frontier_all.pdf"}
    assert {p.name for p in runs[0].iterdir()} == expected
    for name in sorted(expected - {"provenance.json"}):
        data = (runs[0] / name).read_bytes()
        assert data.startswith(b"\x89PNG" if name.endswith(".png") else b"%PDF")
        assert len(data) > 5000
        assert data == (runs[1] / name).read_bytes(), f"{name} differs between two runs"
    assert b"CreationDate" not in (runs[0] / f"frontier_{MODEL}.pdf").read_bytes()


def test_the_all_model_frontier_holds_every_sae_and_a_model_named_all_is_refused(results, tmp_path):
    import dataclasses

    from visae.report.figures import frontier_all_figure, theme, write_figures

    rows = collect_rows(results["metrics"])
    with theme():
        fig = frontier_all_figure(rows)
    ax = fig.axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(map(tuple, points)) == sorted((r.l0, r.nmse) for r in rows)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"model", "architecture"} <= set(legend)  # colour: the model (with its store when there are several)
    assert all(any(t.startswith(m) for t in legend) for m in (MODEL, "other-model"))
    with pytest.raises(VisaeError, match="'all' would share its figure names"):
        write_figures([dataclasses.replace(rows[0], model="all")], tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_figures_without_latents_use_metrics_histogram(results, tmp_path):
    out = tmp_path / "fig"
    assert main(["report", "figures", "--metrics", *_args(results["metrics"][:2]), "--out", str(out)]) == 0
    assert (out / f"latent_freq_{MODEL}.png").is_file() and (out / f"frontier_{MODEL}.pdf").is_file()
    assert not list(out.glob("training_*"))


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("visae: error: ")
    return err[0]


def test_errors_are_one_line(results, tmp_path, capsys):
    good = results["metrics"][0]
    bad = tmp_path / "bad" / "layer_0" / "x" / "metrics.json"
    bad.parent.mkdir(parents=True)
    m = json.loads(good.read_text())
    del m["nmse"]
    bad.write_text(json.dumps(m))
    out = tmp_path / "out"
    msg = _error(capsys, ["report", "tables", "--metrics", str(good), str(bad), "--out", str(out)])
    assert str(bad) in msg and "'nmse'" in msg
    assert not out.exists() or not any(out.iterdir())  # nothing half-done

    missing = tmp_path / "nope" / "metrics.json"
    msg = _error(capsys, ["report", "figures", "--metrics", str(missing), "--out", str(out)])
    assert str(missing) in msg and "does not exist" in msg

    bad.write_text("{not json")
    msg = _error(capsys, ["report", "tables", "--metrics", str(bad), "--out", str(out)])
    assert str(bad) in msg and "JSON" in msg

    stray = _relabel(good.parent, tmp_path / "stray", sae="nobody").parent / "latents.csv"
    msg = _error(capsys, ["report", "figures", "--metrics", str(good), "--latents", str(stray), "--out", str(out)])
    assert str(stray) in msg

    broken_log = tmp_path / "log.csv"
    broken_log.write_text("step,tokens\n1,2\n")
    msg = _error(capsys, ["report", "figures", "--metrics", str(good), "--logs", str(broken_log), "--out", str(out)])
    assert str(broken_log) in msg and "'mse'" in msg

    nohist = tmp_path / "nohist" / "metrics.json"
    nohist.parent.mkdir(parents=True)
    m = json.loads(good.read_text())
    del m["log10_freq_hist"]
    m["identity"]["sae"] = "x"
    nohist.write_text(json.dumps(m))
    figs = tmp_path / "figs"
    msg = _error(capsys, ["report", "figures", "--metrics", str(good), str(nohist), "--out", str(figs)])
    assert str(nohist) in msg and "log10_freq_hist" in msg
    assert not list(figs.glob("*.p*"))  # checked before any figure is drawn

    dup = tmp_path / "dup" / "layer_0" / "topk"
    dup.mkdir(parents=True)
    shutil.copy(good, dup / "metrics.json")
    shutil.copy(good.parent / "provenance.json", dup / "provenance.json")
    msg = _error(capsys, ["report", "tables", "--metrics", str(good), str(dup / "metrics.json"), "--out", str(out)])
    assert "both" in msg
    assert not (out / "saes.csv").exists()

"""`visae report saebench` on saebench.json files written to the schema by hand (the brief's
visae-saebench/1): the per-store tables, DVC's metrics file, the per-model figures, and one-line
refusals of files that are not the schema's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from visae.cli import main
from visae.layout import Layout

KS = (1, 2, 5, 20)
STORE_HASH = "ab" * 32


def fake_bench(root: Path, model: str, sae: str, architecture: str, l0: float, *, dataset: str = "fmnist-test",
               layer: int = 2, twin: bool = True, seed: int = 0, spread: bool = True) -> Path:
    """A saebench.json as `visae saebench` writes it, with plausible numbers (a function of l0)."""
    r = math.log2(l0) / 6 + 0.01 * seed
    metrics = {"l0": l0}
    for k in KS:
        metrics[f"sparse_probing_k{k}"] = min(0.99, 0.35 + 0.08 * math.log2(k) + 0.1 * r)
        metrics[f"sparse_probing_floor_k{k}"] = 0.1 + 0.02 * math.log2(k)
    metrics |= {"sparse_probing_ceiling": 0.93, "tpp": 0.2 + 0.1 * r, "tpp_random": 0.01, "absorption": 0.3 - 0.1 * r,
                "absorption_random": 0.5, "shrinkage": 0.9 + 0.05 * r,
                "stability": 0.6 + 0.1 * r if twin else None, "stability_random": 0.05 if twin else None}
    if spread:  # TPP's std over classes (optional: files from before it was written lack it)
        metrics |= {"tpp_std": 0.05 + 0.01 * r, "tpp_random_std": 0.02}
    identity = {"model": model, "dataset": dataset, "layer": layer, "sae": sae, "store_hash": STORE_HASH}
    out = root / Layout().saebench(model, dataset, layer, sae)
    out.mkdir(parents=True)
    doc = {"format": "visae-saebench/1", "identity": identity, "architecture": architecture,
           "entry": {"name": sae, "architecture": architecture}, "width": 512, "metrics": metrics,
           "sparse_probing": {"k": list(KS)}, "tpp": {}, "absorption": {}, "shrinkage": {},
           "stability": {"twin": sae + ".seed1"} if twin else None, "params": {"k": list(KS)}, "provenance": {}}
    (out / "saebench.json").write_text(json.dumps(doc, indent=1))
    return out / "saebench.json"


@pytest.fixture(scope="module")
def benches(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("bench")
    specs = [("vit-a", "topk-16", "topk", 16.0), ("vit-a", "topk-8", "topk", 8.0),
             ("vit-a", "relu-l1-0.04", "relu", 20.5), ("vit-b", "topk-16", "topk", 16.0),
             ("vit-b", "relu-l1-0.04", "relu", 25.0)]
    paths = [fake_bench(root, m, s, a, l0, twin=s != "topk-8") for m, s, a, l0 in specs]
    paths.append(fake_bench(root, "vit-a", "topk-16", "topk", 16.0, layer=4, seed=1))  # a second store of vit-a
    return paths


def _run(paths, out: Path) -> int:
    return main(["report", "saebench", "--results", *map(str, paths), "--tables", str(out / "tables"),
                 "--figures", str(out / "figures"), "--metrics-file", str(out / "metrics.json")])


def test_tables_metrics_file_and_figures(benches, tmp_path, capsys):
    assert _run(benches, tmp_path) == 0
    assert capsys.readouterr().out.startswith("6 SAE(s) in 3 store(s) -> ")
    tables = tmp_path / "tables"
    stems = {"vit-a__fmnist-test__layer_2", "vit-a__fmnist-test__layer_4", "vit-b__fmnist-test__layer_2"}
    assert {p.name for p in tables.iterdir()} == {f"{s}.{e}" for s in stems for e in ("md", "csv", "tex", "json")}
    df = pd.read_csv(tables / "vit-a__fmnist-test__layer_2.csv")
    assert df.sae.tolist() == ["relu-l1-0.04", "topk-8", "topk-16"]  # architecture, then sparsity
    metric_cols = list(df.columns[df.columns.get_loc("l0"):])
    assert metric_cols == ["l0", "sparse_probing_k1", "sparse_probing_floor_k1", "sparse_probing_k2",
                           "sparse_probing_floor_k2", "sparse_probing_k5", "sparse_probing_floor_k5",
                           "sparse_probing_k20", "sparse_probing_floor_k20", "sparse_probing_ceiling", "tpp",
                           "tpp_std", "tpp_random", "tpp_random_std", "absorption", "absorption_random", "shrinkage",
                           "stability", "stability_random"]
    written = json.loads(benches[0].read_text())["metrics"]
    row = df[df.sae == "topk-16"].iloc[0]
    assert all(row[k] == pytest.approx(v) for k, v in written.items())  # full precision
    assert math.isnan(df[df.sae == "topk-8"].iloc[0]["stability"])  # no twin: null, empty in the csv
    md = (tables / "vit-a__fmnist-test__layer_2.md").read_text().splitlines()
    header = [h.strip() for h in md[0].strip("|").split("|")]
    assert header[:5] == ["SAE", "architecture", "width", "L0", "probing k=1"] and header[5] == "floor k=1"
    assert header[-2:] == ["stability", "stability random"]
    at = header.index("TPP")
    assert header[at:at + 4] == ["TPP", "TPP std", "TPP random", "TPP random std"]  # the spread beside TPP
    assert f"{written['tpp']:.3f}" in md[4]  # topk-16's row, rounded
    tex = (tables / "vit-a__fmnist-test__layer_2.tex").read_text()
    assert "\\toprule" in tex and "probing k=20" in tex
    keyed = json.loads((tables / "vit-a__fmnist-test__layer_2.json").read_text())
    assert keyed["vit-a/fmnist-test/layer_2/topk-8"]["stability"] is None
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"vit-a/fmnist-test/layer_2/topk-16", "vit-a/fmnist-test/layer_2/topk-8",
                            "vit-a/fmnist-test/layer_2/relu-l1-0.04", "vit-b/fmnist-test/layer_2/topk-16",
                            "vit-b/fmnist-test/layer_2/relu-l1-0.04", "vit-a/fmnist-test/layer_4/topk-16"}
    assert metrics["vit-a/fmnist-test/layer_2/topk-16"] == pytest.approx(written)
    assert "stability" not in metrics["vit-a/fmnist-test/layer_2/topk-8"]  # nulls left out for DVC
    figures = tmp_path / "figures"
    assert {p.name for p in figures.iterdir()} == {f"saebench_{m}.{e}" for m in ("vit-a", "vit-b")
                                                   for e in ("png", "pdf")} | {"provenance.json"}
    assert (figures / "saebench_vit-a.png").read_bytes().startswith(b"\x89PNG")


def test_tables_of_stores_no_longer_benched_are_deleted_and_the_spread_is_optional(benches, tmp_path):
    from visae.report.saebench import load_benches, write_tables

    tables = tmp_path / "tables"
    write_tables(load_benches(benches), tables)
    (tables / "notes.md").write_text("mine\n")  # not a table's name: kept
    old = fake_bench(tmp_path / "old", "vit-a", "topk-16", "topk", 16.0, spread=False)  # written before tpp_std
    write_tables(load_benches([old]), tables)
    assert {p.name for p in tables.iterdir()} == {f"vit-a__fmnist-test__layer_2.{e}"
                                                  for e in ("md", "csv", "tex", "json")} | {"notes.md"}
    df = pd.read_csv(tables / "vit-a__fmnist-test__layer_2.csv")
    assert df.sae.tolist() == ["topk-16"] and "tpp_std" not in df and "tpp_random_std" not in df
    assert list(df.columns[df.columns.get_loc("tpp"):][:3]) == ["tpp", "tpp_random", "absorption"]


def test_the_figure_draws_each_metric_beside_its_baseline(benches):
    from visae.report.figures import theme
    from visae.report.saebench import bench_figure, load_benches

    stores = load_benches(benches)
    with theme():
        fig = bench_figure("vit-b", stores[("vit-b", "fmnist-test", "layer_2")])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(KS) + 4  # a probing panel per k, TPP, absorption, shrinkage, stability
    probing = panels[0]
    styles = sorted(line.get_linestyle() for line in probing.get_lines())
    assert styles == sorted(["-", "-", "--", "--", ":", ":"])  # per architecture: the SAE, its floor, the ceiling
    tpp = panels[len(KS)]
    solid = [line for line in tpp.get_lines() if line.get_linestyle() == "-"]
    assert sorted(float(v) for line in solid for v in line.get_ydata()) == pytest.approx(sorted(
        json.loads(p.read_text())["metrics"]["tpp"] for p in benches[3:5]))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["metrics"].pop("tpp_random"), "lacks key(s) metrics.tpp_random: rerun `visae saebench`"),
    (lambda d: d.pop("identity"), "lacks key(s) identity"),
    (lambda d: d.update(format="visae-saebench/0"), "is format 'visae-saebench/0'"),
    (lambda d: d["metrics"].pop("sparse_probing_floor_k5"), "lacks key(s) metrics.sparse_probing_floor_k5"),
    (lambda d: d["metrics"].update(absorption="high"), "metrics.absorption is 'high', not a number or null"),
])
def test_a_file_off_the_schema_is_refused_in_one_line_before_anything_is_written(benches, tmp_path, capsys, edit,
                                                                                 message):
    broken = tmp_path / "saebench.json"
    doc = json.loads(benches[1].read_text())
    edit(doc)
    broken.write_text(json.dumps(doc))
    assert _run([benches[0], broken], tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_one_sae_twice_is_refused(benches, tmp_path, capsys):
    assert _run([benches[0], benches[0]], tmp_path) == 1
    assert "are both the SAEBench of vit-a/fmnist-test/layer_2/topk-16" in capsys.readouterr().err

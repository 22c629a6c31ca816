"""`visae report readme` on a small results tree whose tables are written by the real table writers."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from visae.atomic import write_json
from visae.errors import VisaeError
from visae.layout import FIGURE_FORMATS, RUN_MARKER, Layout, layer_dir
from visae.provenance import provenance
from visae.report import summary
from visae.report.collect import Row
from visae.report.comparison import write_table
from visae.report.interventions import Result, write_task_table
from visae.report.tables import write_tables

MODELS = ("vit-a", "vit-b")
DATASET, LAYER, HASH = "fmnist-test", 2, "ab" * 32
# (sae, architecture, k, λ, L0, NMSE on vit-a); vit-b's NMSE is twice vit-a's. The second seed of topk-16 has
# the lowest NMSE of its L0 range: it is topk-16's baseline, never the range's best.
SAES = [("relu-a", "relu", None, 0.01, 18.0, 0.0456), ("topk-16", "topk", 16, None, 16.0, 0.0123),
        ("topk-16.seed1", "topk", 16, None, 16.0, 0.0111), ("topk-32", "topk", 32, None, 32.0, 0.00789)]
FINDING = "Suppressing each class's latent moves it by +0.5 (a random latent: +0.01): it moves its target."


def _row(model: str, sae, arch, k, lam, l0, nmse) -> Row:
    scale = 1 if model == "vit-a" else 2
    return Row(model=model, dataset=DATASET, layer=LAYER, sae=sae, store_hash=HASH, architecture=arch, width=256,
               k=k, lam=lam, l0=l0, mse=nmse * scale, nmse=nmse * scale, explained_variance=1 - nmse * scale,
               dead_fraction=0.01, dense_fraction=0.02, path=Path("metrics.json"))


def _marker(model: str) -> dict:
    """An extraction marker as `visae extract` writes it (the keys the page reads)."""
    return {"model": {"name": model, "source": "pretrain", "arch": "vit_tiny_patch16_224", "n_layers": 4,
                      "d_model": 64, "image_size": [28, 28], "identity": {"weights_sha256": "cd" * 32}},
            "dataset": {"name": DATASET, "classes": [f"c{i}" for i in range(10)],
                        "spec": {"format": "fashion-mnist", "split": "test"}},
            "n_images": 1000, "stores": {layer_dir(LAYER): {"layer": LAYER, "store_hash": HASH}}}


def _intervention(model: str, seed: int) -> Result:
    """An intervention summary with the keys the classification table reads."""
    stat = {"mean": 0.1 * (seed + 1), "std": 0.01}
    methods = ["latent", "random_latent"]
    return Result(Path("intervention.json"), {
        "task": "classification", "model": model, "dataset": "probe-test", "layer": LAYER, "sae": "topk-16",
        "identity": {"dataset": DATASET, "store_hash": HASH}, "n_classes": 10, "n_images": 300,
        "suppress_scale": -2.0, "insert_scale": 1.0, "accuracy_before": 0.8, "methods": methods,
        "probe": {"metric": "top1", "test_score": 0.8 + seed / 100, "random_init_score": 0.3},
        "suppression": {m: {"delta_prob": stat, "delta_acc": stat, "other_delta_acc": stat} for m in methods},
        "insertion": {m: {"flip_rate": stat} for m in methods},
        "finding": {"moves_more_than_baselines": True, "text": f"{FINDING} ({model})"}}, pd.DataFrame())


def build_tree(root: Path, compare: bool = True, interventions: bool = True, saebench: bool = True) -> Layout:
    """A results tree at Layout's paths: the SAE table, extraction markers and provenance, and optionally
    the comparison's tables, a classification table and SAEBench tables; a file per figure."""
    layout = Layout(str(root))
    write_tables([_row(m, *s) for m in MODELS for s in SAES], layout.tables_dir())
    write_json(Path(layout.tables_dir()) / RUN_MARKER, provenance({"command": "report tables"}))
    figures = [layout.figure(kind, m, ext) for kind in ("frontier", "latent_freq") for m in MODELS
               for ext in FIGURE_FORMATS] + [str(Path(layout.figures_dir()) / "unforeseen.png")]
    for m in MODELS:
        marker = Path(layout.extract_marker(m, DATASET))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(_marker(m)))
        write_json(Path(layout.store(m, DATASET, LAYER)) / RUN_MARKER, provenance({"command": "extract"}))
        write_json(layout.sae_pass_marker(m, DATASET, LAYER, "grid"),
                   provenance({"grid": [{"name": s[0]} for s in SAES]}))
    if compare:
        out = Path(layout.comparison_tables_dir())
        profiles = pd.DataFrame([{"model": m, "dataset": DATASET, "layer": LAYER, "sae": "topk-16", "store_hash": HASH,
                                  "purity": 0.61 + i / 10, "purity_chance": 0.24, "abstract": 0.3,
                                  "abstract_chance": 0.01, "f1_single": 0.55, "baseline_f1_single": 0.15,
                                  "inv_blur": 0.4, "inv_edges": 0.2, "inv_baseline": 0.1}
                                 for i, m in enumerate(MODELS)])
        write_table(profiles, out, "profiles", ["model", "dataset", "layer", "sae"])
        pairs = [("seed baseline", m, m, "topk-16.seed1", 0.5 + i / 10, None, None) for i, m in enumerate(MODELS)]
        pairs.append(("cross-model", "vit-a", "vit-b", "topk-16", 0.234, 0.5, 0.6))
        matching = pd.DataFrame([{"kind": kind, "model_a": a, "layer_a": LAYER, "sae_a": "topk-16", "model_b": b,
                                  "layer_b": LAYER, "sae_b": sb, "dataset": DATASET, "images": 1000,
                                  "threshold": 0.5, "matched": matched, "null": 0.0123, "seed_a": sa, "seed_b": sbb}
                                 for kind, a, b, sb, matched, sa, sbb in pairs])
        write_table(matching, out, "matching", ["kind", "model_a", "layer_a", "sae_a", "model_b", "layer_b", "sae_b"])
        similarity = pd.DataFrame([{"model_a": "vit-a", "model_b": "vit-b", "dataset": DATASET, "pool": "cls",
                                    "layer_a": LAYER, "layer_b": LAYER, "k": 10, "cka": 0.456, "cka_null": 0.001,
                                    "mutual_knn": 0.2, "mutual_knn_null": 0.01}])
        write_table(similarity, out, "similarity", ["model_a", "model_b", "pool", "layer_a", "layer_b"])
        write_json(Path(layout.comparison_figures_dir()) / RUN_MARKER, provenance({"command": "report compare"}))
        figures += [layout.comparison_figure("abstraction", m, "png") for m in MODELS]
        figures += [layout.comparison_figure("matching", "vit-a__vit-b", ext) for ext in FIGURE_FORMATS]
    if interventions:
        out = Path(layout.intervention_tables_dir())
        out.mkdir(parents=True)
        write_task_table("classification", [_intervention(m, i) for i, m in enumerate(MODELS)], out)
        write_json(Path(layout.intervention_figures_dir()) / RUN_MARKER, provenance({"command": "report intv"}))
        figures += [layout.intervention_figure("dose", "classification", m, "png") for m in MODELS]
    if saebench:
        for m in MODELS:
            table = {f"{m}/{DATASET}/{layer_dir(LAYER)}/{s[0]}": {
                "identity": {"model": m, "dataset": DATASET, "layer": LAYER, "sae": s[0], "store_hash": HASH},
                "metrics": {"l0": s[4], "sparse_probing_k1": 0.7 + i / 100, "sparse_probing_k5": 0.8,
                            "sparse_probing_floor_k1": 0.345, "tpp": 0.1, "tpp_random": 0.01,
                            "absorption": 0.2, "absorption_random": 0.3, "stability": None}}
                for i, s in enumerate(SAES)}
            for ext in ("json", "md", "csv", "tex"):
                path = Path(layout.saebench_table(m, DATASET, LAYER, ext))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(table) if ext == "json" else f"| {m} saebench |\n|:--|\n| x |\n")
        figures += [layout.saebench_figure(m, "png") for m in MODELS]
    for path in figures:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"figure")
    Path(layout.browser_index()).parent.mkdir(parents=True, exist_ok=True)
    Path(layout.browser_index()).write_text("<html></html>")
    return layout


def write_readme(results: Path, out: Path | None = None) -> str:
    parser = argparse.ArgumentParser()
    summary.add_arguments(parser)
    argv = ["--results-dir", str(results)] + (["--out", str(out)] if out else [])
    assert summary.run(parser.parse_args(argv)) == 0
    return (out or Path(Layout(str(results)).readme())).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("summary") / "results"
    build_tree(root)
    return root


def _links(text: str) -> list[str]:
    return [m.group(1).strip("<>") for m in re.finditer(r"\]\(([^)]+)\)", text) if not m.group(1).startswith("#")]


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def test_numbered_tables_links_and_what_was_run(tree):
    text = write_readme(tree)
    layout = Layout(str(tree))
    titles = re.findall(r"^### (Table \w+)\.", text, flags=re.M)
    assert titles == ["Table 1", "Table 2a", "Table 2b", "Table 2c", "Table 3", "Table 4", "Table 5a", "Table 5b"]
    assert "### Table 4. Segmentation interventions\n\nNot run." in text
    for path in [layout.table("saes", "md"), layout.comparison_table("matching", "md"),
                 layout.intervention_table("classification", "md"),
                 layout.saebench_table("vit-b", DATASET, LAYER, "md")]:
        assert Path(path).read_text().rstrip("\n") in text  # each Markdown table embedded whole
    links = _links(text)
    missing = [link for link in links
               if not ((tree / link).is_dir() if link.endswith("/") else (tree / link).is_file())]
    assert links and not missing, missing
    figures = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.suffix in (".png", ".pdf")}
    assert figures <= set(links)  # every figure, the unforeseen one too
    for table in ("tables/saes", "compare/tables/profiles", "interventions/tables/classification"):
        assert {f"{table}.csv", f"{table}.tex"} <= set(links)
    assert {"browser/index.html", "tables/provenance.json"} <= set(links)
    assert "report.html" not in links and "snakemake --report results/report.html" in text

    run = _section(text, "## What was run", "## Headline numbers")
    prov = json.loads((tree / "tables" / RUN_MARKER).read_text())
    assert prov["git"]["sha"] is None or prov["git"]["sha"] in run
    assert f"torch {prov['packages']['torch']}" in run and f"timm {prov['packages']['timm']}" in run
    assert "provenance.json files read" in run and run.count("| train |") == 2 and run.count("| extract |") == 2
    assert f"| vit-a | pretrain | vit_tiny_patch16_224 | {LAYER} of 4 | 64 | 28x28 |" in run
    assert f"| {DATASET} | fashion-mnist | test | 1000 | 10 | activation stores |" in run
    assert "| probe-test | - | - | 300 | 10 | classification probe's test images |" in run
    assert "| topk-16.seed1 (second seed of topk-16) | topk | 256 | 16 | - | all |" in run
    assert f"Trained on 2 activation stores (model · dataset · layer, store hash): vit-a · {DATASET} · {LAYER} " \
           f"(`{HASH[:12]}`)" in run


def test_headline_numbers_are_the_inputs(tree):
    text = write_readme(tree)
    saes = _section(text, "**1 · SAEs**", "**2 · Comparison**")
    # vit-a, 10 < L0 <= 20: topk-16 beats relu-a; its second seed (lower still) is its baseline, not the best
    assert "vit-a (layer 2, fmnist-test) — 10 < L0 ≤ 20: topk-16 0.0123 (second seed 0.0111, best relu relu-a " \
           "0.0456); 20 < L0 ≤ 50: topk-32 0.00789." in saes
    assert "vit-b (layer 2, fmnist-test) — 10 < L0 ≤ 20: topk-16 0.0246 (second seed 0.0222, best relu relu-a " \
           "0.0912)" in saes
    compare = _section(text, "**2 · Comparison**", "**3 · Interventions**")
    assert "vit-a ↔ vit-b topk-16 0.234 (seeds 0.5 / 0.6, null 0.0123)" in compare
    assert "vit-a: topk-16 0.61 (0.24); vit-b: topk-16 0.71 (0.24)" in compare
    assert "mean of blur, edges; random images in brackets — vit-a: topk-16 0.3 (0.1)" in compare
    assert "vit-a ↔ vit-b CLS token: CKA 0.456 (0.001), mutual 10-NN 0.2 (0.01)" in compare
    interventions = _section(text, "**3 · Interventions**", "**4 · SAEBench**")
    assert "top-1 accuracy, a random-init model's in brackets — vit-a 0.8 (0.3) on probe-test, vit-b 0.81 (0.3)" \
        in interventions
    assert f"vit-b topk-16 (layer 2): {FINDING} (vit-b)" in interventions
    bench = _section(text, "**4 · SAEBench**", "## Tables")
    assert "vit-a (layer 2, fmnist-test): sparse probing (k=1) topk-32 0.73 (0.345), TPP relu-a 0.1 (0.01), " \
           "absorption relu-a 0.2 (0.3)." in bench


def test_same_inputs_same_bytes_and_links_from_elsewhere(tree, tmp_path):
    first = write_readme(tree)
    assert write_readme(tree) == first
    assert not list(tree.glob(".README.md.*.tmp"))
    elsewhere = tmp_path / "pages" / "README.md"
    text = write_readme(tree, elsewhere)
    links = _links(text)
    assert all((elsewhere.parent / link).exists() for link in links) and links[0].startswith("../")


def test_optional_phases_are_left_out(tmp_path):
    root = tmp_path / "results"
    build_tree(root, compare=False, interventions=False, saebench=False)
    text = write_readme(root)
    assert "**2 · Comparison**: not run" in text and "**4 · SAEBench**" not in text
    assert re.findall(r"^### (Table \w+)\.", text, flags=re.M) == ["Table 1", "Table 2", "Table 3", "Table 4",
                                                                   "Table 5"]
    # without a comparison there is no seed pair: the second seed competes like any SAE
    assert "10 < L0 ≤ 20: topk-16.seed1 0.0111 (best relu relu-a 0.0456)" in text


@pytest.mark.parametrize("remove, named", [
    ("tables/saes.json", "SAE table {root}/tables/saes.json does not exist"),
    ("tables/saes.tex", "SAE table {root}/tables/saes.tex does not exist"),
    ("compare/tables/matching.tex", "comparison matching table {root}/compare/tables/matching.tex does not exist"),
    ("activations/vit-b/fmnist-test/extract.json", "extraction marker {root}/activations/vit-b/fmnist-test/"
                                                   "extract.json does not exist"),
    ("interventions/figures/provenance.json", "provenance file {root}/interventions/figures/provenance.json "
                                              "does not exist"),
])
def test_a_missing_input_is_one_line_naming_it(tree, tmp_path, remove, named):
    root = tmp_path / "results"
    shutil.copytree(tree, root)
    (root / remove).unlink()
    (root / "README.md").unlink(missing_ok=True)
    with pytest.raises(VisaeError) as err:
        write_readme(root)
    message = str(err.value)
    assert "\n" not in message and named.format(root=root) in message
    assert not (root / "README.md").exists() and not list(root.glob(".README.md.*"))


def test_a_table_naming_another_sae_is_refused(tree, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(tree, root)
    saes = root / "tables" / "saes.json"
    data = json.loads(saes.read_text())
    data["vit-a/fmnist-test/layer_2/renamed"] = data.pop("vit-a/fmnist-test/layer_2/topk-16")
    saes.write_text(json.dumps(data))
    with pytest.raises(VisaeError, match=r"has no L0 and NMSE for vit-a/fmnist-test/layer_2/topk-16"):
        write_readme(root)
    marker = root / "activations" / "vit-a" / DATASET / "extract.json"
    marker.write_text(json.dumps(_marker("vit-b")))
    shutil.copy(tree / "tables" / "saes.json", saes)
    with pytest.raises(VisaeError, match=r"is about model 'vit-b', dataset 'fmnist-test', not 'vit-a'"):
        write_readme(root)


def test_the_cli_prints_one_line(tree, tmp_path, capsys):
    pytest.importorskip("visae.report.browser")  # `visae report` builds every part's parser
    from visae.cli import main

    assert main(["report", "readme", "--results-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"visae: error: results folder {tmp_path / 'none'} does not exist"]

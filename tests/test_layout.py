"""The results tree is defined once (visae.layout), and the workflow's rules use it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from visae.errors import VisaeError
from visae.layout import FIGURE_KINDS, Identity, Layout, layer_dir, seed_twin

REPO = Path(__file__).resolve().parents[1]
RULES = sorted((REPO / "workflow" / "rules").glob("*.smk"))


def test_paths_of_the_results_tree():
    r = Layout("out/")
    assert r.pretrain_model("m") == "out/pretrain/m/model.safetensors"
    assert r.extract_marker("m", "d") == "out/activations/m/d/extract.json"
    assert r.store("m", "d", -2) == "out/activations/m/d/layer_-2"
    assert r.sae_pass_marker("m", "d", 6, "p") == "out/saes/m/d/layer_6/p/provenance.json"
    assert r.sae("m", "d", "layer_6", "p", "s") == "out/saes/m/d/layer_6/p/s"
    assert r.sae_log("m", "d", 6, "p", "s") == "out/saes/m/d/layer_6/p/s/log.csv"
    assert r.metrics("m", "d", "6", "s") == "out/evaluate/m/d/layer_6/s/metrics.json"
    assert r.latents("m", "d", 6, "s") == "out/evaluate/m/d/layer_6/s/latents.csv"
    assert r.figure("frontier", "a/b c", "png") == "out/figures/frontier_a_b_c.png"
    assert r.table("saes", "json") == "out/tables/saes.json"
    assert r.log("train", "m", "d", "layer_6", "p") == "out/logs/train/m/d/layer_6/p.log"
    assert r.benchmark("report", "tables") == "out/benchmarks/report/tables.tsv"
    # Snakemake wildcards pass through, so rules build their patterns here too
    assert r.metrics("{model}", "{dataset}", "{layer}", "{sae}") == \
        "out/evaluate/{model}/{dataset}/{layer}/{sae}/metrics.json"
    assert r.latent_index_marker("m", "d", 6, "s") == "out/latents/m/d/layer_6/s/index.json"
    assert r.profile_marker("m", "d", -2, "s") == "out/profiles/m/d/layer_-2/s/profile.json"
    assert r.comparison_marker("a", 6, "s", "b", -2, "s", "d") == "out/compare/a__b/d/layer_6__layer_-2/s__s/matching.json"
    assert r.comparison("a", 6, "s", "a", 6, seed_twin("s"), "d") == "out/compare/a__a/d/layer_6__layer_6/s__s.seed1"
    assert r.similarity_marker("a", "b", "d") == "out/compare/a__b/d/similarity/similarity.json"
    assert len({r.latent_index("m", "d", 6, "s"), r.comparison("a", 6, "s", "b", 6, "s", "d"), r.probe("classification", "m", "d"),
                r.profile("m", "d", 6, "s"), r.similarity("a", "b", "d"),
                r.intervention("segmentation", "m", "d", 6, "s"), r.browser(), r.readme(), r.report_html()}) == 9
    with pytest.raises(TypeError):
        layer_dir(True)


def test_identity_round_trips_and_names_the_file_it_lacks():
    ident = Identity.of({"name": "m"}, {"name": "d"}, 2, "s", "ab" * 32)
    assert ident.to_dict() == {"model": "m", "dataset": "d", "layer": 2, "sae": "s", "store_hash": "ab" * 32}
    assert ident.key == "m/d/layer_2/s"
    assert Identity.from_file({"identity": {**ident.to_dict(), "layer": "2"}}, "f") == ident
    with pytest.raises(VisaeError, match="^metrics file x.json has no 'identity' block"):
        Identity.from_file({"l0": 1.0}, "metrics file x.json")
    with pytest.raises(VisaeError, match="^f: identity lacks store_hash$"):
        Identity.from_file({"identity": {**ident.to_dict(), "store_hash": ""}}, "f")


def test_layout_imports_without_torch():
    """The Snakefile imports it on every dry run: it must stay cheap."""
    code = "import sys, visae.layout; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _code(path: Path) -> str:
    """A rule file without its comments."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def test_no_results_path_is_written_by_hand_in_the_rules():
    folders = "|".join(("results", "pretrain", "activations", "saes", "evaluate", "tables", "figures", "logs",
                        "benchmarks"))
    by_hand = re.compile(rf"\{{RESULTS\}}|[\"']({folders})/|[\"'/](metrics\.json|latents\.csv|provenance\.json|"
                         rf"extract\.json|model\.safetensors|log\.csv)|[\"']layer_")
    for path in RULES:
        hits = [m.group(0) for m in by_hand.finditer(_code(path))]
        assert not hits, f"{path.name} spells out results paths: {hits}"


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every `name(...)` call in `text`."""
    calls = []
    for m in re.finditer(rf"\b{name}\(", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[m.end():i - 1])
    return calls


def test_every_report_output_has_a_caption_and_every_rule_tails_its_log():
    captions = 0
    for path in RULES:
        text = _code(path)
        for call in _calls(text, "report"):
            m = re.search(r"caption=f?\"([^\"]+)\"", call)
            assert m, f"{path.name}: report({call.split(',')[0]}, ...) has no caption"
            names = [m.group(1).format(kind=kind) for kind in FIGURE_KINDS] if "{kind}" in m.group(1) \
                else [m.group(1)]
            for name in names:
                assert (path.parent / name).resolve().is_file(), f"{path.name}: caption {name} is missing"
                captions += 1
        for block in re.split(r"\n(?=rule )", text):
            if "shell:" in block:
                assert "logged(" in block and "tail -n" not in block, f"{path.name}: {block.split(':')[0]}"
    assert captions >= 5


def test_the_trees_file_names_are_spelled_only_in_layout():
    """The commands that write the tree's files and the rules that wait for them share one name."""
    names = re.compile(r"[\"'](metrics\.json|latents\.csv|provenance\.json|extract\.json|model\.safetensors|"
                       r"log\.csv)[\"']|f[\"']layer_|[\"']layer_[{\"']")
    src = REPO / "src" / "visae"
    for path in sorted(src.rglob("*.py")):
        if path.name == "layout.py":
            continue
        hits = [m.group(0) for m in names.finditer(_code(path))]
        assert not hits, f"{path.relative_to(REPO)} spells out names visae.layout defines: {hits}"

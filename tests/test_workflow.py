"""The real Snakemake workflow and DVC pipeline, run on a tiny copy of the demo config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from visae.layout import Layout

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The test config's results tree: its one SAE pass per SAE, its layer 1, its one dataset.
DATASET, LAYER = "fmnist-test", 1

pytestmark = pytest.mark.usefixtures("fashion_mnist_dir")


def tiny_config() -> dict:
    """The workflow's test config (.test/config/config.yaml): the demo shrunk to seconds."""
    return yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def copy_project(dst: Path, config: dict) -> Path:
    """The repo's tracked files (as in a fresh clone) with the given config, as a new git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith("tests/"):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    (dst / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    run(dst, "git", "init", "-q")
    run(dst, "git", "add", "-A")
    run(dst, *git, "commit", "-qm", "copy")
    return dst


def planned_jobs(proc: subprocess.CompletedProcess) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job in a dry run's plan."""
    jobs, rule = [], None
    for line in proc.stdout.splitlines():
        if m := re.match(r"^(?:localrule|rule) (\w+):", line.strip()):
            rule = m.group(1)
            jobs.append((rule, {}))
        elif (m := re.match(r"^wildcards: (.*)$", line.strip())) and jobs:
            jobs[-1] = (rule, dict(kv.split("=", 1) for kv in m.group(1).split(", ")))
    return jobs


# `project` (tests/conftest.py): a copy of the project that has run the full DAG once, shared with
# tests/test_slurm.py (its local reference run).


def test_full_dag_writes_tables_figures_and_provenance(project):
    results = Layout(project / "results")
    table = Path(results.table("saes", "md")).read_text()
    for model in ("vit-supervised", "vit-simclr"):
        for sae in ("relu-l1-0.01", "topk-16"):
            assert re.search(rf"{model}.*{sae}|{sae}.*{model}", table), (model, sae)
        for kind in ("frontier", "latent_freq", "training"):
            for ext in ("png", "pdf"):
                assert Path(results.figure(kind, model, ext)).stat().st_size > 1000
    assert "\\toprule" in Path(results.table("saes", "tex")).read_text()
    dirs = [results.pretrain_dir("vit-simclr"), results.store("vit-simclr", DATASET, LAYER),
            results.sae_pass("vit-simclr", DATASET, LAYER, "topk-16"),
            results.evaluation("vit-simclr", DATASET, LAYER, "topk-16"), results.tables_dir(), results.figures_dir()]
    for d in dirs:
        prov = json.loads((Path(d) / "provenance.json").read_text())
        assert {"git", "config_hash", "packages", "device", "seeds"} <= set(prov), d
    metrics = json.loads(Path(results.metrics("vit-supervised", DATASET, LAYER, "topk-16")).read_text())
    assert metrics["l0"] == pytest.approx(16.0)
    # every output names itself, and the names agree with the store it was made from
    meta = json.loads((Path(results.store("vit-supervised", DATASET, LAYER)) / "meta.json").read_text())
    identity = {"model": "vit-supervised", "dataset": DATASET, "layer": meta["layer"], "sae": "topk-16"}
    assert {k: metrics["identity"][k] for k in identity} == identity
    sae_config = json.loads((Path(results.sae("vit-supervised", DATASET, LAYER, "topk-16", "topk-16"))
                             / "config.json").read_text())
    assert sae_config["identity"] == metrics["identity"]


def test_full_dag_compares_the_models_against_the_seed_baseline(project):
    import pandas as pd

    results = Layout(project / "results")
    matching = pd.read_csv(results.comparison_table("matching", "csv"))
    assert sorted(matching.kind) == ["cross-model", "seed baseline", "seed baseline"]
    cross = matching[matching.kind == "cross-model"].iloc[0]
    assert (cross.model_a, cross.model_b, cross.sae_a) == ("vit-simclr", "vit-supervised", "topk-16")
    assert 0 <= cross.matched <= 1 and 0 <= cross.seed_a <= 1 and 0 <= cross.seed_b <= 1
    seed = matching[matching.kind == "seed baseline"]
    assert set(seed.sae_b) == {"topk-16.seed1"}
    profiles = pd.read_csv(results.comparison_table("profiles", "csv"))
    assert sorted(profiles.model) == ["vit-simclr", "vit-supervised"] and profiles.purity.between(0, 1).all()
    similarity = pd.read_csv(results.comparison_table("similarity", "csv"))
    assert sorted(similarity["pool"]) == ["cls", "mean"]
    for kind in ("matching", "exemplars"):
        assert Path(results.comparison_figure(kind, "vit-simclr__vit-supervised", "png")).stat().st_size > 1000
    twin = json.loads((Path(results.sae("vit-supervised", DATASET, LAYER, "topk-16.seed1", "topk-16.seed1"))
                       / "config.json").read_text())
    original = json.loads((Path(results.sae("vit-supervised", DATASET, LAYER, "topk-16", "topk-16"))
                           / "config.json").read_text())
    assert twin["seed"] != original["seed"] and twin["split"] == original["split"]  # independent init, same split
    again = run(project, "snakemake", "--cores", "2")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_full_dag_runs_the_interventions(project):
    import pandas as pd

    results = Layout(project / "results")
    for task, dataset, models in (("classification", "fmnist-test", ["vit-simclr", "vit-supervised"]),
                                  ("segmentation", "mosaic-test", ["vit-supervised"])):
        table = pd.read_csv(results.intervention_table(task, "csv"))
        assert sorted(table.model) == models and set(table.sae) == {"topk-16"}
        for model in models:
            marker = json.loads(Path(results.intervention_marker(task, model, dataset, LAYER, "topk-16")).read_text())
            assert marker["task"] == task and marker["identity"]["model"] == model
            assert "random_latent" in marker["methods"] and "random_direction" in marker["methods"]
            for kind in ("dose", "example"):
                assert Path(results.intervention_figure(kind, task, model, "png")).stat().st_size > 1000
            probe = json.loads(Path(results.probe_marker(task, model, dataset)).read_text())
            assert 0 <= probe["test_score"] <= 1 and 0 <= probe["random_init"]["test_score"] <= 1


def test_full_dag_writes_the_readme_and_a_browser_that_works_in_chromium(project, tmp_path):
    from chromium import check_browser

    results = Layout(project / "results")
    readme = Path(results.readme()).read_text()
    for heading in ("## What was run", "## Headline numbers", "Table 1", "Table 3", "Table 5"):
        assert heading in readme, heading
    for link in re.findall(r"\]\(([^)#]+)\)", readme):  # every relative link resolves
        if "://" not in link:
            assert (project / "results" / link).exists(), link
    assert "browser/index.html" in readme
    check_browser(results.browser(), tmp_path / "browser.png")
    assert (tmp_path / "browser.png").stat().st_size > 10_000


def test_full_dag_runs_the_vision_saebench(project):
    import pandas as pd

    results = Layout(project / "results")
    metrics = json.loads(Path(results.saebench_metrics()).read_text())
    for model in ("vit-simclr", "vit-supervised"):
        marker = json.loads(Path(results.saebench_marker(model, DATASET, LAYER, "topk-16")).read_text())
        assert marker["identity"]["model"] == model and marker["format"] == "visae-saebench/1"
        assert marker["metrics"]["stability"] is not None  # the second seed is there
        assert metrics[f"{model}/{DATASET}/layer_{LAYER}/topk-16"]["l0"] == marker["metrics"]["l0"]
        table = pd.read_csv(results.saebench_table(model, DATASET, LAYER, "csv"))
        assert list(table.sae) == ["topk-16"]
        assert Path(results.saebench_figure(model, "png")).stat().st_size > 1000


def test_lint_is_clean(project):
    proc = run(project, "snakemake", "--lint", "--configfile", ".test/config/config.yaml")
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_paper_config_plans_the_whole_dag(project):
    proc = run(project, "snakemake", "-n", "--configfile", "config/paper.yaml")
    counts = {}
    for rule, _ in planned_jobs(proc):
        counts[rule] = counts.get(rule, 0) + 1
    # 2 models x ImageNet, the 9-SAE grid trained in one pass per store and the compared SAE's second
    # seed in a pass of its own, 20 evaluations; the comparison: 2 SAEs indexed per model, a profile per model, the
    # cross-model matching and one seed baseline per model, CKA / mutual kNN for the pair; the
    # interventions: CLIP's CUB probe and DINOv2's ADE20K probe, one edited SAE each; the SAEBench:
    # every grid SAE on each store (their indexes too: 9 + the second seed per model); the browser,
    # the README
    assert counts == {"extract": 2, "train": 4, "evaluate": 20, "latent_index": 20, "profile": 2, "compare": 3,
                      "similarity": 1, "compare_report": 1, "tables": 1, "figures": 1, "probe": 2, "intervene": 2,
                      "intervene_report": 1, "saebench": 18, "saebench_report": 1, "browser": 1, "readme": 1,
                      "all": 1}


def test_paper_run_without_data_names_the_missing_input(tmp_path, project):
    """Without a GPU the paper config's cuda jobs stop at their first job, naming the device; on
    CPU (or a GPU machine) the missing data is named by its config key."""
    proc = run(project, "snakemake", "--cores", "1", "--configfile", "config/paper.yaml", "--until", "extract",
               check=False)
    assert proc.returncode != 0
    import torch
    if not torch.cuda.is_available():
        assert "visae: error: visae extract: --device 'cuda' requested but no CUDA GPU is available: use cpu" in (
            proc.stdout + proc.stderr)
    paper = yaml.safe_load((project / "config" / "paper.yaml").read_text())
    for section in ("extract", "train"):
        paper[section]["device"] = "cpu"
    (tmp_path / "paper-cpu.yaml").write_text(yaml.safe_dump(paper))
    proc = run(project, "snakemake", "--cores", "1", "--configfile", str(tmp_path / "paper-cpu.yaml"),
               "--until", "extract", check=False)
    assert proc.returncode != 0
    assert re.search(r"visae: error: (datasets|models)\.[\w-]+: .*(not found|does not exist)",
                     proc.stdout + proc.stderr)


def test_adding_a_model_plans_only_its_jobs(project, tmp_path):
    config = tiny_config()
    config["models"]["vit-random"] = {"source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 28,
                                      "model_kwargs": {"patch_size": 7, "depth": 2, "embed_dim": 32,
                                                       "num_heads": 2}, "layers": [0]}
    path = project / "config" / "three.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(run(project, "snakemake", "-n", "--configfile", str(path)))
    per_model = [(rule, wc) for rule, wc in jobs if "model" in wc]
    assert per_model and all(wc["model"] == "vit-random" for _, wc in per_model)
    # its own: three passes (the compared topk-16's second seed has its own), three evaluations, the
    # compared SAE's index and its second seed's, one profile; the classification probe and its
    # intervention (the test config segments one named model only); the benched topk-16's SAEBench
    assert sorted(rule for rule, wc in per_model) == ["evaluate"] * 3 + ["extract", "intervene", "latent_index",
                                                                          "latent_index", "probe", "profile",
                                                                          "saebench", "train", "train", "train"]
    # the cross-model jobs: its pairs with each model, its seed baseline, and the reports
    pairs = [(rule, wc) for rule, wc in jobs if "model_a" in wc]
    assert sorted(rule for rule, _ in pairs) == ["compare"] * 3 + ["similarity"] * 2
    assert all("vit-random" in (wc["model_a"], wc["model_b"]) for _, wc in pairs)
    assert sorted(rule for rule, wc in jobs if not wc) == ["all", "browser", "compare_report", "figures",
                                                           "intervene_report", "readme", "saebench_report", "tables"]


def test_an_imported_sae_is_planned_like_a_trained_one(project, tmp_path):
    """An `import:` entry (here SAELens folders exported from the run's topk-16) is imported, not
    trained, then evaluated and tabled like the others."""
    results = Layout(project / "results")
    config = tiny_config()
    paths = {}
    for model in config["models"]:
        out = tmp_path / model
        run(project, "visae", "sae", "export", "--sae", results.sae(model, DATASET, LAYER, "topk-16", "topk-16"),
            "--out", str(out))
        paths[model] = str(out)
    config["saes"]["lens"] = {"import": "saelens", "path": paths}
    path = project / "config" / "imported.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(run(project, "snakemake", "-n", "--configfile", str(path)))
    lens = sorted((rule, wc["model"]) for rule, wc in jobs if "lens" in (wc.get("sae"), wc.get("pass_")))
    assert lens == sorted((rule, m) for m in config["models"] for rule in ("evaluate", "import_sae"))
    assert not [wc for rule, wc in jobs if rule == "train" and wc.get("pass_") == "lens"]


def test_changing_one_sae_replans_only_that_sae(project):
    config = tiny_config()
    config["saes"]["relu-l1-0.01"]["lr"] = 0.002
    path = project / "config" / "lr.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(run(project, "snakemake", "-n", "--configfile", str(path)))
    trained = sorted((rule, wc.get("pass_", wc.get("sae")), wc["model"]) for rule, wc in jobs if "model" in wc)
    assert trained == [("evaluate", "relu-l1-0.01", "vit-simclr"), ("evaluate", "relu-l1-0.01", "vit-supervised"),
                       ("train", "relu-l1-0.01", "vit-simclr"), ("train", "relu-l1-0.01", "vit-supervised")]


@pytest.mark.parametrize("change, key", [
    ({"modles": {}}, "modles"),
    ({"extract": {"datasets": ["fmnist-test"], "dtype": "fp8"}}, "dtype"),
    ({"saes": {"bad": {"architecture": "gated"}}}, "architecture"),
])
def test_bad_config_fails_before_any_job(project, change, key):
    config = {**tiny_config(), **change}
    path = project / "config" / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run(project, "snakemake", "-n", "--configfile", str(path), check=False)
    assert proc.returncode != 0 and key in proc.stdout + proc.stderr
    assert "Job stats" not in proc.stdout


def test_snakemake_report_embeds_figures(project):
    report = Layout("results").report_html()
    run(project, "snakemake", "--report", report)
    html = (project / report).read_text(errors="replace")
    assert "frontier_vit-supervised.png" in html and "saes.csv" in html
    for caption in sorted((project / "workflow" / "report").glob("*.rst")):
        opening = " ".join(caption.read_text().split()[:3])
        assert opening in html, f"{caption.name} is not in the report"


def test_dvc_repro_is_a_noop_then_reruns_from_train(project, tmp_path):
    first = run(project, "dvc", "repro")
    assert "Nothing to be done" in first.stdout + first.stderr
    second = run(project, "dvc", "repro")
    assert second.stdout.count("didn't change, skipping") == 9

    config = yaml.safe_load((project / "config" / "config.yaml").read_text())
    config["saes"]["relu-l1-0.01"]["lr"] = 0.002
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    third = run(project, "dvc", "repro")
    out = third.stdout
    assert "Stage 'pretrain' didn't change, skipping" in out and "Stage 'extract' didn't change, skipping" in out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out and "Running stage 'tables'" in out

    # push to a local directory remote, lose the results, pull them back
    table = Path(Layout(project / "results").table("saes", "md")).read_bytes()
    run(project, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))
    run(project, "dvc", "push")
    shutil.rmtree(Layout(project / "results").tables_dir())
    shutil.rmtree(project / ".dvc" / "cache")
    run(project, "dvc", "pull")
    assert Path(Layout(project / "results").table("saes", "md")).read_bytes() == table
    run(project, "snakemake", "--touch", "--cores", "1")
    assert "Nothing to be done" in run(project, "snakemake", "-n").stdout


def test_dvc_exp_run_sets_a_param(project):
    # the classification's insertions per class: the interventions stage reruns, with the new value
    proc = run(project, "dvc", "exp", "run", "-S", "config/config.yaml:interventions.classification.insert_targets=1")
    assert "Running stage 'interventions'" in proc.stdout
    marker = Path(Layout(project / "results").intervention_marker("classification", "vit-supervised", DATASET,
                                                                   LAYER, "topk-16"))
    assert json.loads(marker.read_text())["config"]["insert_targets"] == 1


def test_two_clean_runs_give_identical_metrics(project, tmp_path):
    """A second clean copy, run to these targets only, writes the same bytes as the full DAG's run."""
    results = Layout("results")
    # the metrics and the seed baseline's matching (latent indexes of both seeds, correlations,
    # assignment, permutation null, exemplars); the probes' and interventions' reruns are compared
    # byte for byte in tests/test_task_probes.py and tests/test_intervene.py
    targets = [results.metrics("vit-supervised", DATASET, LAYER, "topk-16"),
               results.comparison_marker("vit-supervised", LAYER, "topk-16", "vit-supervised", LAYER,
                                         "topk-16.seed1", DATASET)]
    again = copy_project(tmp_path, tiny_config())
    run(again, "snakemake", "--cores", "2", *targets)
    assert [(again / t).read_bytes() for t in targets] == [(project / t).read_bytes() for t in targets]

"""`visae report readme`: results/README.md, the page a reader follows top to bottom.

It says what was run (code, packages, device, models, datasets, SAEs), gives the headline numbers
of each phase beside their baselines, embeds the paper's tables (numbered, each linked to its .csv
and .tex), and links every figure, the latent browser and the Snakemake report.

Inputs are found under `--results-dir` at `visae.layout.Layout`'s paths, and every one names what
it is about: the tables' JSON files (keyed by model/dataset/layer/SAE; `saes.csv` adds each SAE's
architecture, width, k and λ, which saes.json lacks), the extraction markers (each model's source,
architecture and layers, each dataset's format), and the stages' provenance.json files. The SAE
table is required; the comparison, the interventions and the SAEBench appear when their tables
exist, and then every file of theirs must be there. A missing file is a one-line error naming it.
The page is written atomically and holds nothing that is not in its inputs (no clock), so the same
inputs give the same bytes.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from visae.atomic import atomic_path
from visae.errors import VisaeError
from visae.layout import (COMPARISON_TABLES, FIGURE_FORMATS, FIGURE_KINDS, INTERVENTION_FIGURES, LAYER_PREFIX,
                          MODEL_COMPARISON_FIGURES, PAIR_COMPARISON_FIGURES, RUN_MARKER, SAEBENCH_FIGURES, TASKS,
                          Identity, Layout, layer_dir)
from visae.report.collect import read_json

L0_EDGES = (10, 20, 50, 100, 200, 500, 1000)  # the L0 ranges of the SAE headline: (0, 10], (10, 20], ...
KEY_PACKAGES = ("torch", "timm", "open_clip_torch")  # the versions that change numbers, listed first
TABLE_EXTS = ("md", "csv", "tex")  # the formats beside each table's .json

# What each figure shows, in a line (the captions under workflow/report/ say it at length).
FIGURE_LINES = {
    "frontier": "NMSE against L0, one point per SAE (lower and further left is better)",
    "latent_freq": "how often each latent fires on held-out tokens (dead latents counted)",
    "training": "training MSE and L0 against tokens seen",
    "abstraction": "specific / abstract / mixed latents, beside random latents",
    "invariance": "top images still firing under domain shifts, beside random images",
    "matching": "matched correlations between the two models, beside each model's second seed",
    "exemplars": "the latents most specific to each model: top images with patch heatmaps",
    "dose": "the edit's effect against its scale: the chosen latent beside the baselines",
    "example": "the edit on a few test images",
    "saebench": "every SAEBench metric against L0, per architecture",
}
TABLE_LINES = {
    "saes": "One row per SAE: L0, MSE, NMSE and explained variance on held-out tokens, dead and dense "
            "latents. NMSE 1 is the mean predictor.",
    "profiles": "Per SAE: class purity and abstract fraction of its latents beside random latents, the concept "
                "probe's F1 beside matched-frequency latents, invariance per shift beside random images.",
    "matching": "Per pair of SAEs: the fraction of live latents matched one-to-one above the threshold, beside "
                "the permutation null and (cross-model rows) each model's seed baseline.",
    "similarity": "Per pair of models and layers: debiased CKA and mutual k-NN, beside their nulls.",
    "classification": "Per edited SAE: the probe's top-1 beside a random-init model's, then each method's effect "
                      "(mean ± std over classes): the chosen latent beside a random latent of matched frequency, "
                      "a random direction and the probe's own direction.",
    "segmentation": "Per edited SAE: the probe's mIoU beside a random-init model's, then each method's target and "
                    "other change rates and mIoU after the edit (mean ± std over classes), the chosen latent "
                    "beside the baselines.",
    "saebench": "Per SAE of one store: sparse probing beside its floor, TPP, absorption and stability beside "
                "random latents, and shrinkage.",
}
PHASE_TITLES = {"saes": "1 · SAEs", "compare": "2 · Comparison", "interventions": "3 · Interventions",
                "saebench": "4 · SAEBench"}


# -- small helpers -------------------------------------------------------------------------------

def _num(value) -> str:
    """A number as the page shows it: 3 significant digits, '-' for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.3g}"


def _layer(value):
    """A layer as tables write it ('2', 'layer_2', 2) -> 2; a named layer stays a string."""
    text = str(value)
    if text.startswith(LAYER_PREFIX):
        text = text[len(LAYER_PREFIX):]
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _split_key(key: str, parts: int, path: Path) -> list[str]:
    """A table row's key (its key columns joined by '/'), split back into its columns."""
    fields = str(key).split("/")
    if len(fields) != parts:
        raise VisaeError(f"table {path}: row key {key!r} is not {parts} fields joined by '/' "
                         f"(a name with '/' in it?)")
    return fields


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def _mean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


@dataclass
class Table:
    """One table: its JSON (the numbers), and the .md/.csv/.tex beside it."""

    name: str
    json_path: Path
    data: dict

    def file(self, ext: str) -> Path:
        return self.json_path.with_suffix(f".{ext}")

    @property
    def markdown(self) -> str:
        return self.file("md").read_text(encoding="utf-8").rstrip("\n")


def _table(path: str | Path, name: str) -> Table:
    """The table at `path` (.json), refused in one line when it or a format beside it is missing."""
    path = Path(path)
    data = read_json(path, f"{name} table")
    for ext in TABLE_EXTS:
        if not path.with_suffix(f".{ext}").is_file():
            raise VisaeError(f"{name} table {path.with_suffix(f'.{ext}')} does not exist (beside {path.name}): "
                             f"rerun the report stage that writes it")
    return Table(name, path, data)


# -- the inputs ----------------------------------------------------------------------------------

@dataclass
class Sae:
    model: str
    dataset: str
    layer: int | str
    sae: str
    architecture: str
    width: str
    k: str
    lam: str
    l0: float
    nmse: float

    @property
    def store(self) -> tuple:
        return (self.model, self.dataset, self.layer)


@dataclass
class Provenance:
    stage: str
    what: str
    path: Path
    data: dict


@dataclass
class Inputs:
    results: Path
    layout: Layout
    saes_table: Table
    saes: list[Sae]
    markers: list[dict]  # extraction markers
    provenance: list[Provenance]
    compare: dict[str, Table] = field(default_factory=dict)
    interventions: dict[str, Table] = field(default_factory=dict)
    saebench: list[tuple[tuple, Table, list]] = field(default_factory=list)  # (store, table, [(sae, metrics)])
    seed_twins: dict[tuple, str] = field(default_factory=dict)  # (model, layer, sae) -> its second seed


def _saes(table: Table) -> list[Sae]:
    """The SAE table's rows: names and hyperparameters from saes.csv, L0 and NMSE from saes.json."""
    path = table.file("csv")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    needed = ("model", "dataset", "layer", "sae", "architecture", "width", "k", "lambda")
    if rows and any(col not in rows[0] for col in needed):
        raise VisaeError(f"SAE table {path} lacks column(s) {', '.join(c for c in needed if c not in rows[0])}")
    out = []
    for r in rows:
        key = f"{r['model']}/{r['dataset']}/{layer_dir(r['layer'])}/{r['sae']}"
        numbers = table.data.get(key)
        if not isinstance(numbers, dict) or not all(isinstance(numbers.get(m), (int, float)) for m in ("l0", "nmse")):
            raise VisaeError(f"SAE table {table.json_path} has no L0 and NMSE for {key} (a row of {path}): "
                             f"rerun `visae report tables`")
        out.append(Sae(r["model"], r["dataset"], _layer(r["layer"]), r["sae"], r["architecture"], r["width"],
                       r["k"], r["lambda"], float(numbers["l0"]), float(numbers["nmse"])))
    if len(out) != len(table.data):
        raise VisaeError(f"SAE tables {table.json_path} and {path} do not hold the same SAEs: "
                         f"rerun `visae report tables`")
    if not out:
        raise VisaeError(f"SAE table {path} holds no SAE")
    return out


def _marker(layout: Layout, model: str, dataset: str) -> dict:
    """An extraction marker, checked to be about the model and dataset it is read for."""
    path = Path(layout.extract_marker(model, dataset))
    m = read_json(path, "extraction marker")
    named = ((m.get("model") or {}).get("name"), (m.get("dataset") or {}).get("name"))
    if named != (model, dataset):
        raise VisaeError(f"extraction marker {path} is about model {named[0]!r}, dataset {named[1]!r}, "
                         f"not {model!r}, {dataset!r}")
    if not isinstance(m.get("stores"), dict):
        raise VisaeError(f"extraction marker {path} lacks its 'stores' block: rerun `visae extract`")
    return m | {"path": path}


def _provenance(path: Path, stage: str, what: str, required: bool = True) -> list[Provenance]:
    if not required and not path.is_file():
        return []
    data = read_json(path, "provenance file")
    missing = [k for k in ("git", "config_hash", "packages", "device") if k not in data]
    if missing:
        raise VisaeError(f"provenance file {path} lacks {', '.join(missing)}")
    return [Provenance(stage, what, path, data)]


def _saebench_entries(table: Table) -> tuple[tuple, list]:
    """(store, [(sae, metrics)]) of one SAEBench table: each entry names its SAE by an `identity` block
    or by its key (model/dataset/layer_L/sae), and holds a `metrics` block (or is one)."""
    entries = []
    for key, value in sorted(table.data.items()):
        if not isinstance(value, dict):
            continue
        if "identity" in value:
            ident = Identity.from_file(value, table.json_path)
            name = (ident.model, ident.dataset, ident.layer, ident.sae)
        else:
            model, dataset, layer, sae = _split_key(key, 4, table.json_path)
            name = (model, dataset, _layer(layer), sae)
        metrics = value.get("metrics", value)
        if not isinstance(metrics, dict):
            raise VisaeError(f"SAEBench table {table.json_path}: {key} has no 'metrics' block")
        entries.append((name, {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float))}))
    stores = {name[:3] for name, _ in entries}
    if len(stores) != 1:
        raise VisaeError(f"SAEBench table {table.json_path} holds {len(stores)} stores, not one "
                         f"(each entry needs an identity block or a model/dataset/layer_L/sae key)")
    return stores.pop(), [(name[3], metrics) for name, metrics in entries]


def gather(results: str | Path) -> Inputs:
    """Every input of the page, read and checked; a missing one is a one-line error naming it."""
    results = Path(results)
    if not results.is_dir():
        raise VisaeError(f"results folder {results} does not exist")
    layout = Layout(str(results))
    saes_table = _table(layout.table("saes", "json"), "SAE")
    saes = _saes(saes_table)
    markers = [_marker(layout, model, dataset) for model, dataset in sorted({(s.model, s.dataset) for s in saes})]
    prov: list[Provenance] = []
    for m in markers:
        model, dataset = m["model"]["name"], m["dataset"]["name"]
        if m["model"].get("source") == "pretrain":
            prov += _provenance(Path(layout.pretrain_dir(model)) / RUN_MARKER, "pretrain", model, required=False)
        for store in sorted(m["stores"].values(), key=lambda s: str(s.get("layer"))):
            layer = store.get("layer")
            prov += _provenance(Path(layout.store(model, dataset, layer)) / RUN_MARKER, "extract",
                                f"{model} · {dataset} · layer {layer}")
            passes = Path(layout.sae_pass(model, dataset, layer, "_")).parent
            for marker in sorted(passes.glob(f"*/{RUN_MARKER}")):
                grid = (read_json(marker, "provenance file").get("config") or {}).get("grid") or []
                names = ", ".join(str(e.get("name")) for e in grid if isinstance(e, dict))
                prov += _provenance(marker, "train", f"{model} · layer {layer}: {names}")
    prov += _provenance(Path(layout.tables_dir()) / RUN_MARKER, "report tables", "Table 1")
    prov += _provenance(Path(layout.figures_dir()) / RUN_MARKER, "report figures", "SAE figures", required=False)
    inputs = Inputs(results, layout, saes_table, saes, markers, prov)

    if Path(layout.comparison_tables_dir()).is_dir():
        inputs.compare = {name: _table(layout.comparison_table(name, "json"), f"comparison {name}")
                          for name in COMPARISON_TABLES}
        inputs.provenance += _provenance(Path(layout.comparison_figures_dir()) / RUN_MARKER, "report compare",
                                         "Tables 2a-2c, comparison figures")
        for key in inputs.compare["matching"].data:
            kind, model_a, layer_a, sae_a, _, _, sae_b = _split_key(key, 7, inputs.compare["matching"].json_path)
            if kind == "seed baseline":
                inputs.seed_twins[(model_a, _layer(layer_a), sae_a)] = sae_b
    for task in TASKS:
        if Path(layout.intervention_table(task, "json")).is_file():
            inputs.interventions[task] = _table(layout.intervention_table(task, "json"), f"{task} intervention")
    if inputs.interventions:
        inputs.provenance += _provenance(Path(layout.intervention_figures_dir()) / RUN_MARKER,
                                         "report interventions", "Tables 3-4, intervention figures")
    bench_dir = Path(layout.saebench_tables_dir())
    for path in sorted(bench_dir.glob("*.json")) if bench_dir.is_dir() else []:
        if path.name == RUN_MARKER:
            continue
        table = _table(path, "SAEBench")
        store, entries = _saebench_entries(table)
        inputs.saebench.append((store, table, entries))
    inputs.saebench.sort(key=lambda t: tuple(str(v) for v in t[0]))
    if inputs.saebench:
        for folder in (layout.saebench_tables_dir(), layout.saebench_figures_dir()):
            inputs.provenance += _provenance(Path(folder) / RUN_MARKER, "report saebench", "Table 5, SAEBench figures",
                                             required=False)
    inputs.provenance += _provenance(Path(layout.browser()) / RUN_MARKER, "report browser", "latent browser",
                                     required=False)
    return inputs


# -- the page ------------------------------------------------------------------------------------

class Page:
    """Markdown lines, with links relative to the page's own folder."""

    def __init__(self, out: Path):
        self.base = os.path.abspath(out.parent)
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def link(self, text: str, path) -> str:
        rel = Path(os.path.relpath(os.path.abspath(path), self.base)).as_posix() + ("/" if Path(path).is_dir() else "")
        return f"[{text}](<{rel}>)" if " " in rel else f"[{text}]({rel})"

    def text(self) -> str:
        out = "\n".join(self.lines).rstrip("\n") + "\n"
        return re.sub(r"\n{3,}", "\n\n", out)


def _device(d: dict) -> str:
    what = d.get("gpu") or ("CUDA GPU" if d.get("cuda") else "CPU")
    threads = d.get("torch_threads")
    extra = [str(d[k]) for k in ("platform",) if d.get(k)]
    if d.get("python"):
        extra.append(f"Python {d['python']}")
    if threads:
        extra.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
    return f"{what} ({', '.join(extra)})" if extra else what


def _git(g: dict) -> str:
    sha = (g or {}).get("sha")
    if not sha:
        return "not a git checkout"
    dirty = (g or {}).get("dirty")
    return f"`{sha[:12]}` ({'uncommitted changes' if dirty else 'clean' if dirty is False else 'dirty flag unknown'})"


def _what_was_run(page: Page, inp: Inputs) -> None:
    prov = inp.provenance
    page.add("## What was run", "")
    gits = Counter(((p.data["git"] or {}).get("sha"), (p.data["git"] or {}).get("dirty")) for p in prov)
    if len(gits) == 1:
        (sha, dirty), = gits
        page.add(f"- **Code**: git {_git({'sha': sha, 'dirty': dirty})}, the same in all {len(prov)} provenance "
                 f"files{f' (full SHA `{sha}`)' if sha else ''}.")
    else:
        page.add(f"- **Code**: ⚠ {len(gits)} code versions across the {len(prov)} provenance files: "
                 + "; ".join(f"git {_git({'sha': s, 'dirty': d})} in {n}" for (s, d), n in sorted(
                     gits.items(), key=lambda t: (-t[1], str(t[0])))) + ".")
    versions: dict[str, Counter] = {}
    for p in prov:
        for name, version in sorted((p.data["packages"] or {}).items()):
            versions.setdefault(name, Counter())[str(version)] += 1
    order = [n for n in KEY_PACKAGES if n in versions] + sorted(n for n in versions if n not in KEY_PACKAGES)

    def pkg(name):
        c = versions[name]
        if len(c) == 1:
            return f"{name} {next(iter(c))}"
        return f"⚠ {name} " + " / ".join(f"{v} ({n} files)" for v, n in sorted(c.items()))
    key = [pkg(n) for n in order if n in KEY_PACKAGES]
    rest = [pkg(n) for n in order if n not in KEY_PACKAGES]
    page.add(f"- **Packages**: {', '.join(key)}" + (f"; also {', '.join(rest)}" if rest else "") + ".")
    devices: dict[str, list[str]] = {}
    for p in prov:
        stages = devices.setdefault(_device(p.data["device"] or {}), [])
        if p.stage not in stages:
            stages.append(p.stage)
    if len(devices) == 1:
        page.add(f"- **Device**: {next(iter(devices))} for every stage.")
    else:
        page.add("- **Device**: " + "; ".join(f"{d} for {', '.join(s)}" for d, s in devices.items()) + ".")
    page.add(f"- **Config**: each stage hashes the settings it ran with; the {len(prov)} hashes are in the "
             "provenance list below.", "")

    page.add("### Models", "", "| model | source | architecture | layers | width (d_model) | image size | "
             "weights sha256 |", "|:--|:--|:--|:--|--:|:--|:--|")
    seen = set()
    for m in inp.markers:
        model = m["model"]
        if model["name"] in seen:
            continue
        seen.add(model["name"])
        layers = sorted({str(s.get("layer")) for mk in inp.markers if mk["model"]["name"] == model["name"]
                         for s in mk["stores"].values()})
        ident = model.get("identity") or {}
        source = model.get("source", "-")
        if ident.get("pretrained"):
            source += f" ({ident['pretrained']})"
        size = model.get("image_size")
        page.add(f"| {model['name']} | {source} | {model.get('arch', '-')} | {', '.join(layers)} of "
                 f"{model.get('n_layers', '?')} | {model.get('d_model', '-')} | "
                 f"{'x'.join(str(v) for v in size) if isinstance(size, list) else size or '-'} | "
                 f"`{str(ident.get('weights_sha256') or '-')[:12]}` |")
    page.add("", "### Datasets", "", "| dataset | format | split | images | classes | used for |",
             "|:--|:--|:--|--:|--:|:--|")
    datasets: dict[str, dict] = {}
    for m in inp.markers:
        d = m["dataset"]
        spec = d.get("spec") or {}
        datasets.setdefault(d["name"], {"format": spec.get("format", "-"), "split": spec.get("split", "-"),
                                        "images": m.get("n_images", d.get("n_images_total")),
                                        "classes": len(d.get("classes") or []) or "-", "uses": []})
        if "activation stores" not in datasets[d["name"]]["uses"]:
            datasets[d["name"]]["uses"].append("activation stores")
    for task, table in inp.interventions.items():
        for key, row in sorted(table.data.items()):
            _, dataset, _, _ = _split_key(key, 4, table.json_path)
            entry = datasets.setdefault(dataset, {"format": "-", "split": "-", "images": row.get("n_images"),
                                                  "classes": row.get("n_classes", "-"), "uses": []})
            use = f"{task} probe's test images"
            if use not in entry["uses"]:
                entry["uses"].append(use)
    for name, d in sorted(datasets.items()):
        page.add(f"| {name} | {d['format']} | {d['split']} | {d['images'] if d['images'] is not None else '-'} | "
                 f"{d['classes']} | {', '.join(d['uses'])} |")

    stores = [(m["model"]["name"], m["dataset"]["name"], s.get("layer"), str(s.get("store_hash") or "-"))
              for m in inp.markers for s in sorted(m["stores"].values(), key=lambda s: str(s.get("layer")))]
    page.add("", "### SAEs", "", f"Trained on {len(stores)} activation store{'s' * (len(stores) != 1)} (model · "
             "dataset · layer, store hash): " + ", ".join(f"{m} · {d} · {layer} (`{h[:12]}`)"
                                                        for m, d, layer, h in stores) + ".", "",
             "| SAE | architecture | width | k | λ | stores |", "|:--|:--|--:|--:|--:|:--|")
    every = {(m, d, str(layer)) for m, d, layer, _ in stores}
    twins = {twin: sae for (_, _, sae), twin in inp.seed_twins.items()}
    by_name: dict[str, list[Sae]] = {}
    for s in inp.saes:
        by_name.setdefault(s.sae, []).append(s)
    for name, group in sorted(by_name.items()):
        first = group[0]
        note = f" (second seed of {twins[name]})" if name in twins else ""
        on = {(s.model, s.dataset, str(s.layer)) for s in group}
        where = "all" if on == every else ", ".join(" · ".join(t) for t in sorted(on))
        page.add(f"| {name}{note} | {first.architecture} | {first.width} | {first.k or '-'} | "
                 f"{first.lam or '-'} | {where} |")

    page.add("", f"<details><summary>Provenance: the {len(prov)} provenance.json files read</summary>", "",
             "| stage | of | config hash | git | device | wall time (s) | file |", "|:--|:--|:--|:--|:--|--:|:--|")
    for p in prov:
        d = p.data
        page.add(f"| {p.stage} | {p.what} | `{str(d.get('config_hash'))[:12]}` | {_git(d['git'])} | "
                 f"{(d['device'] or {}).get('gpu') or ('GPU' if (d['device'] or {}).get('cuda') else 'CPU')} | "
                 f"{_num(d.get('wall_time_s'))} | {page.link(_relative(p.path, inp.results), p.path)} |")
    page.add("", "</details>", "")


def _l0_range(l0: float) -> str:
    low = 0
    for edge in L0_EDGES:
        if l0 <= edge:
            return f"L0 ≤ {edge}" if low == 0 else f"{low} < L0 ≤ {edge}"
        low = edge
    return f"L0 > {L0_EDGES[-1]}"


def _range_order(label: str) -> int:
    for i, edge in enumerate(L0_EDGES):
        if label.endswith(f"≤ {edge}"):
            return i
    return len(L0_EDGES)


def _by_model(items) -> str:
    """'m1: a x, b y; m2: ...' from [(model, text)], models in their first order."""
    groups: dict[str, list[str]] = {}
    for model, text in items:
        groups.setdefault(model, []).append(text)
    return "; ".join(f"{model}: {', '.join(texts)}" for model, texts in groups.items())


def _headline_saes(inp: Inputs) -> str:
    """Per store and L0 range: the best NMSE, beside the best of each other architecture in the range and
    the SAE's second seed (seed twins are baselines, not candidates)."""
    by_store: dict[tuple, list[Sae]] = {}
    for s in inp.saes:
        by_store.setdefault(s.store, []).append(s)
    twins = {(m, layer, twin) for (m, layer, _), twin in inp.seed_twins.items()}
    sentences = []
    for store, group in sorted(by_store.items(), key=lambda t: tuple(str(v) for v in t[0])):
        nmse = {s.sae: s.nmse for s in group}
        ranges: dict[str, list[Sae]] = {}
        for s in group:
            if (s.model, s.layer, s.sae) not in twins:
                ranges.setdefault(_l0_range(s.l0), []).append(s)
        parts = []
        for label in sorted(ranges, key=_range_order):
            members = sorted(ranges[label], key=lambda s: (s.nmse, s.sae))
            best = members[0]
            notes = []
            twin = inp.seed_twins.get((best.model, best.layer, best.sae))
            if twin in nmse:
                notes.append(f"second seed {_num(nmse[twin])}")
            for arch in sorted({s.architecture for s in members} - {best.architecture}):
                other = next(s for s in members if s.architecture == arch)
                notes.append(f"best {arch} {other.sae} {_num(other.nmse)}")
            parts.append(f"{label}: {best.sae} {_num(best.nmse)}" + (f" ({', '.join(notes)})" if notes else ""))
        model, dataset, layer = store
        sentences.append(f"- {model} (layer {layer}, {dataset}) — " + "; ".join(parts) + ".")
    return (f"**{PHASE_TITLES['saes']}** — how well does each SAE reconstruct the activations at a given "
            "sparsity? (Table 1.) The lowest NMSE on held-out tokens in each L0 range, where 0 is a perfect "
            "reconstruction and 1 the mean predictor; the SAE's second seed and the best SAE of another "
            "architecture in the same range in brackets.\n\n" + "\n".join(sentences))


def _pair(a, la, b, lb) -> str:
    return f"{a} ↔ {b}" if la == lb else f"{a} (layer {la}) ↔ {b} (layer {lb})"


POOLS = {"cls": "CLS token", "mean": "mean-pooled"}


def _headline_compare(inp: Inputs) -> str:
    matching, profiles, similarity = (inp.compare[n] for n in ("matching", "profiles", "similarity"))
    out = [f"**{PHASE_TITLES['compare']}** — do different models' SAEs learn the same latents, and how abstract "
           "and invariant are they? (Tables 2a–2c.)", ""]
    cross = []
    for key, r in sorted(matching.data.items()):
        kind, model_a, layer_a, sae_a, model_b, layer_b, sae_b = _split_key(key, 7, matching.json_path)
        if kind == "cross-model":
            cross.append(f"{_pair(model_a, layer_a, model_b, layer_b)} {sae_a} {_num(r.get('matched'))} "
                         f"(seeds {_num(r.get('seed_a'))} / {_num(r.get('seed_b'))}, null {_num(r.get('null'))})")
    if cross:
        thresholds = "/".join(sorted({_num(r.get("threshold")) for r in matching.data.values()}))
        images = "/".join(sorted({str(r.get("images")) for r in matching.data.values()}))
        out.append(f"- *Matching*: the fraction of live latents matched one-to-one at r > {thresholds} on {images} "
                   "held-out images, beside the same SAE of each model against its own second seed and the "
                   "permutation null: " + "; ".join(cross) + ".")
    prof = []
    for key, r in sorted(profiles.data.items()):
        model, _, _, sae = _split_key(key, 4, profiles.json_path)
        prof.append((model, sae, r))
    if prof:
        out.append("- *Abstraction*: mean class purity of a latent's top images, random latents in brackets — "
                   + _by_model((m, f"{sae} {_num(r.get('purity'))} ({_num(r.get('purity_chance'))})")
                               for m, sae, r in prof)
                   + "; the fraction of abstract latents (top images spanning one coarse group) — "
                   + _by_model((m, f"{sae} {_num(r.get('abstract'))} ({_num(r.get('abstract_chance'))})")
                               for m, sae, r in prof) + ".")
        out.append("- *Concepts*: F1 of each class's best single latent, matched-frequency latents in brackets — "
                   + _by_model((m, f"{sae} {_num(r.get('f1_single'))} ({_num(r.get('baseline_f1_single'))})")
                               for m, sae, r in prof) + ".")
        shifts = sorted({k[4:] for _, _, r in prof for k in r if k.startswith("inv_") and k != "inv_baseline"})
        inv = [(m, f"{sae} {_num(_mean([r.get(f'inv_{s}') for s in shifts]))} ({_num(r.get('inv_baseline'))})")
               for m, sae, r in prof if r.get("inv_baseline") is not None]
        if inv and shifts:
            out.append(f"- *Invariance*: the fraction of top images still firing after a shift, mean of "
                       f"{', '.join(shifts)}; random images in brackets — " + _by_model(inv) + ".")
    sim = []
    for key, r in sorted(similarity.data.items()):
        model_a, model_b, pool, layer_a, layer_b = _split_key(key, 5, similarity.json_path)
        sim.append(f"{_pair(model_a, layer_a, model_b, layer_b)} {POOLS.get(pool, pool)}: CKA {_num(r.get('cka'))} "
                   f"({_num(r.get('cka_null'))}), mutual {r.get('k', 'k')}-NN {_num(r.get('mutual_knn'))} "
                   f"({_num(r.get('mutual_knn_null'))})")
    if sim:
        out.append("- *Similarity* of the models' activations, nulls in brackets — " + "; ".join(sim) + ".")
    return "\n".join(out)


PROBE_METRICS = {"top1": "top-1 accuracy", "miou": "mIoU"}


def _headline_interventions(inp: Inputs) -> str:
    out = [f"**{PHASE_TITLES['interventions']}** — does editing a latent inside the model move what it should, "
           "more than a random latent or direction? (Tables 3–4.)", ""]
    for task, table in inp.interventions.items():
        rows = []
        for key, r in sorted(table.data.items()):
            model, dataset, layer, sae = _split_key(key, 4, table.json_path)
            rows.append((model, dataset, _layer(layer), sae, r))
        metric = "/".join(sorted({PROBE_METRICS.get(str(r.get("probe_metric")), str(r.get("probe_metric")))
                                  for *_, r in rows}))
        probes = sorted({(m, d, _num(r.get("probe_score")), _num(r.get("random_init_score")))
                         for m, d, _, _, r in rows})
        out.append(f"- *{task.capitalize()}*: the task probe's {metric}, a random-init model's in brackets — "
                   + ", ".join(f"{m} {s} ({b}) on {d}" for m, d, s, b in probes) + ".")
        for model, _, layer, sae, r in rows:
            out.append(f"  - {model} {sae} (layer {layer}): {r.get('finding') or '(no finding)'}")
    return "\n".join(out)


# SAEBench metric -> (label, its baseline's key, higher is better)
SAEBENCH_HEADLINE = (("tpp", "TPP", "tpp_random", True), ("absorption", "absorption", "absorption_random", False),
                     ("stability", "stability", "stability_random", True))


def _headline_saebench(inp: Inputs) -> str:
    out = [f"**{PHASE_TITLES['saebench']}** — how do the SAEs score on the vision SAEBench? (Table 5.) Per store, "
           "the best SAE on each metric (lowest absorption, highest otherwise), its baseline from the same run "
           "in brackets (sparse probing: its floor; the others: random latents).", ""]
    for (model, dataset, layer), _, entries in inp.saebench:
        ks = sorted({int(k.rsplit("_k", 1)[1]) for _, m in entries for k in m
                     if re.fullmatch(r"sparse_probing_k\d+", k)})
        metrics = ([(f"sparse_probing_k{ks[0]}", f"sparse probing (k={ks[0]})", f"sparse_probing_floor_k{ks[0]}",
                     True)] if ks else []) + list(SAEBENCH_HEADLINE)
        parts = []
        for key, label, base, higher in metrics:
            scored = [(sae, m) for sae, m in entries if isinstance(m.get(key), (int, float))]
            if scored:
                sae, m = sorted(scored, key=lambda t: (-t[1][key] if higher else t[1][key], t[0]))[0]
                parts.append(f"{label} {sae} {_num(m[key])} ({_num(m.get(base))})")
        out.append(f"- {model} (layer {layer}, {dataset}): " + (", ".join(parts) or "no metric") + ".")
    return "\n".join(out)


def _headlines(page: Page, inp: Inputs) -> None:
    page.add("## Headline numbers", "", "Each number sits beside the baseline measured in the same run; the tables "
             "below hold every number at full precision in their CSV files.", "", _headline_saes(inp), "")
    page.add(_headline_compare(inp) if inp.compare else
             f"**{PHASE_TITLES['compare']}**: not run (the config's `compare.saes` is empty).", "")
    page.add(_headline_interventions(inp) if inp.interventions else
             f"**{PHASE_TITLES['interventions']}**: not run (the config's `interventions.saes` is empty).", "")
    if inp.saebench:
        page.add(_headline_saebench(inp), "")


def _table_block(page: Page, title: str, table: Table, line: str) -> None:
    links = " · ".join(page.link(table.file(ext).name, table.file(ext)) for ext in ("csv", "tex"))
    page.add(f"### {title}", "", f"{line} Full precision: {links}.", "", table.markdown, "")


def _tables(page: Page, inp: Inputs) -> None:
    page.add("## Tables", "")
    _table_block(page, "Table 1. SAE metrics per model", inp.saes_table, TABLE_LINES["saes"])
    if inp.compare:
        for letter, name in zip("abc", COMPARISON_TABLES):
            _table_block(page, f"Table 2{letter}. The comparison: {name}", inp.compare[name], TABLE_LINES[name])
    else:
        page.add("### Table 2. The comparison", "", "Not run.", "")
    for number, task in zip((3, 4), TASKS):
        if task in inp.interventions:
            _table_block(page, f"Table {number}. {task.capitalize()} interventions", inp.interventions[task],
                         TABLE_LINES[task])
        else:
            page.add(f"### Table {number}. {task.capitalize()} interventions", "", "Not run.", "")
    if inp.saebench:
        for i, ((model, dataset, layer), table, _) in enumerate(inp.saebench):
            letter = "abcdefghijklmnopqrstuvwxyz"[i] if len(inp.saebench) > 1 and i < 26 else \
                ("" if len(inp.saebench) == 1 else f".{i + 1}")
            _table_block(page, f"Table 5{letter}. SAEBench: {model} · {dataset} · layer {layer}", table,
                         TABLE_LINES["saebench"])
    else:
        page.add("### Table 5. SAEBench", "", "Not run.", "")


def _figure_groups(inp: Inputs) -> list[tuple[str, Path, list[tuple[str, list[tuple[str, str]]]]]]:
    """(phase, folder, [(kind line, [(label, path stem without extension)])]) of every figure the results
    should hold, from the names the inputs give (models, pairs, tasks) and Layout's figure paths."""
    lay = inp.layout
    models = sorted({m["model"]["name"] for m in inp.markers})
    groups = [(PHASE_TITLES["saes"], Path(lay.figures_dir()),
               [(kind, [(m, lay.figure(kind, m, "png")[:-4]) for m in models]) for kind in FIGURE_KINDS])]
    if inp.compare:
        pairs = sorted({(a, b) for key in inp.compare["matching"].data
                        for kind, a, _, _, b, _, _ in [_split_key(key, 7, inp.compare["matching"].json_path)]
                        if kind == "cross-model"})
        kinds = [(kind, [(m, lay.comparison_figure(kind, m, "png")[:-4]) for m in models])
                 for kind in MODEL_COMPARISON_FIGURES]
        kinds += [(kind, [(f"{a} ↔ {b}", lay.comparison_figure(kind, f"{a}__{b}", "png")[:-4]) for a, b in pairs])
                  for kind in PAIR_COMPARISON_FIGURES]
        groups.append((PHASE_TITLES["compare"], Path(lay.comparison_figures_dir()), kinds))
    if inp.interventions:
        kinds = []
        for task, table in inp.interventions.items():
            task_models = sorted({_split_key(k, 4, table.json_path)[0] for k in table.data})
            kinds += [(f"{kind} ({task})", [(m, lay.intervention_figure(kind, task, m, "png")[:-4])
                                            for m in task_models]) for kind in INTERVENTION_FIGURES]
        groups.append((PHASE_TITLES["interventions"], Path(lay.intervention_figures_dir()), kinds))
    if inp.saebench or Path(lay.saebench_figures_dir()).is_dir():
        bench_models = sorted({store[0] for store, _, _ in inp.saebench}) or models
        groups.append((PHASE_TITLES["saebench"], Path(lay.saebench_figures_dir()),
                       [(kind, [(m, lay.saebench_figure(m, "png")[:-4]) for m in bench_models])
                        for kind in SAEBENCH_FIGURES]))
    return groups


def _figures(page: Page, inp: Inputs) -> int:
    page.add("## Figures", "")
    count = 0
    for phase, folder, kinds in _figure_groups(inp):
        lines, linked = [], set()
        for kind, items in kinds:
            cells = []
            for label, stem in items:
                files = [Path(f"{stem}.{ext}") for ext in FIGURE_FORMATS if Path(f"{stem}.{ext}").is_file()]
                if files:
                    cells.append(f"{label} (" + " · ".join(page.link(f.suffix[1:], f) for f in files) + ")")
                    linked.update(f.name for f in files)
                    count += len(files)
            if cells:
                base = kind.split(" ")[0]
                lines.append(f"- **{kind}** — {FIGURE_LINES.get(base, '')}: " + ", ".join(cells))
        others = sorted(p for p in folder.glob("*") if p.suffix[1:] in FIGURE_FORMATS and p.name not in linked) \
            if folder.is_dir() else []
        if others:
            lines.append("- other figures: " + ", ".join(page.link(p.name, p) for p in others))
            count += len(others)
        if lines:
            page.add(f"**{phase}** ({page.link(folder.name + '/', folder)})", "", *lines, "")
    return count


def _browse(page: Page, inp: Inputs) -> None:
    browser, report = Path(inp.layout.browser_index()), Path(inp.layout.report_html())
    page.add("## Browse", "")
    if browser.is_file():
        page.add(f"- The latent browser: {page.link('browser/index.html', browser)} — every SAE's latents with "
                 "their top images, opens from disk (file://).")
    else:
        page.add("- The latent browser: not built (`visae report browser`).")
    if report.is_file():
        page.add(f"- The Snakemake report: {page.link('report.html', report)} — every table and figure with its "
                 "caption, the workflow's rule graph and runtimes.")
    else:
        page.add("- The Snakemake report: `snakemake --report results/report.html` builds it (every table and "
                 "figure with its caption, the rule graph, runtimes).")
    page.add("- Everything else: each stage's folder under this one (`evaluate/`, `latents/`, `profiles/`, "
             "`compare/`, `interventions/`, ...) holds its JSON and CSV files and a provenance.json.")


def render(results: str | Path, out: str | Path) -> tuple[str, dict]:
    """The page's text, and counts of what it holds."""
    inp = gather(results)
    page = Page(Path(out))
    models = sorted({m["model"]["name"] for m in inp.markers})
    stores = sorted({s.store for s in inp.saes}, key=lambda t: tuple(str(v) for v in t))
    page.add("# visae results", "",
             f"Sparse autoencoders (SAEs) on {len(models)} vision model{'s' * (len(models) != 1)} "
             f"({', '.join(models)}): {len(inp.saes)} SAEs on {len(stores)} activation store"
             f"{'s' * (len(stores) != 1)}. This page is written by `visae report readme` from the result files "
             "beside it; read it top to bottom: what was run, the headline numbers (each beside its baseline), "
             "the tables, the figures, and where to browse further.", "",
             "Contents: [What was run](#what-was-run) · [Headline numbers](#headline-numbers) · "
             "[Tables](#tables) · [Figures](#figures) · [Browse](#browse)", "")
    _what_was_run(page, inp)
    _headlines(page, inp)
    _tables(page, inp)
    figures = _figures(page, inp)
    _browse(page, inp)
    tables = 1 + len(inp.compare) + len(inp.interventions) + len(inp.saebench)
    return page.text(), {"tables": tables, "figures": figures, "provenance": len(inp.provenance)}


def add_arguments(parser) -> None:
    parser.add_argument("--results-dir", default="results", help="the results folder (default: results)")
    parser.add_argument("--out", default=None, help="the page to write (default: RESULTS/README.md)")


def run(args) -> int:
    out = Path(args.out or Layout(args.results_dir).readme())
    text, counts = render(args.results_dir, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # only this page's temporaries: others write beside it
        stale.unlink(missing_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"{out}: {counts['tables']} table(s), {counts['figures']} figure file(s), "
          f"{counts['provenance']} provenance file(s)")
    return 0

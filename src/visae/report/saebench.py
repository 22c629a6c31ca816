"""`visae report saebench`: the vision SAEBench's tables, DVC metrics file and figures.

Reads the `saebench.json` files `visae saebench` writes (format visae-saebench/1: identity,
architecture, entry, width and a flat `metrics` block, every value a number or null) and writes:
- per store (model, dataset, layer), `<tables>/<model>__<dataset>__layer_<L>.{md,csv,tex,json}`:
  one row per SAE with every metric, each beside its baseline (k-sparse probing beside its floor,
  then the ceiling; TPP and its spread over classes beside random latents'; absorption beside
  random latents'; stability beside random SAEs'); csv and json at full precision under the metric
  keys, md and tex rounded under a reader's names; a store's tables that no file given is of any
  more (a store no longer benched) are deleted;
- `--metrics-file` (DVC's): {"model/dataset/layer_L/sae": {metric: value}}, nulls left out;
- per model, `<figures>/saebench_<model>.{png,pdf}`: one panel per metric against L0, a colour per
  architecture, the baselines dashed in the same colour (the probing ceiling dotted);
- `<figures>/provenance.json`, last.
Every file is read and checked before anything is written; a file that lacks a key of the schema
is refused in one line that names the file and the key.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from visae.errors import VisaeError
from visae.layout import Identity, Layout, layer_dir

FORMAT = "visae-saebench/1"
RERUN = "rerun `visae saebench`"
KEYS = ("format", "identity", "architecture", "entry", "width", "metrics", "sparse_probing", "tpp", "absorption",
        "shrinkage", "stability", "params", "provenance")
PAIRED = (("tpp", "tpp_random"), ("absorption", "absorption_random"), ("stability", "stability_random"))
METRICS = ("l0", "sparse_probing_ceiling", *(k for pair in PAIRED for k in pair), "shrinkage")  # besides the k ones
OPTIONAL = ("tpp_std", "tpp_random_std")  # TPP's spread over classes: shown when a file has it
PROBING = re.compile(r"sparse_probing_k(\d+)$")
TABLE = re.compile(r"[A-Za-z0-9._-]+__[^/]+__[^/]+\.(md|csv|tex|json)")  # Layout.saebench_table's names
LABELS = {"l0": "L0", "sparse_probing_ceiling": "probing ceiling", "tpp": "TPP", "tpp_std": "TPP std",
          "tpp_random": "TPP random", "tpp_random_std": "TPP random std",
          "absorption": "absorption", "absorption_random": "absorption random", "shrinkage": "shrinkage",
          "stability": "stability", "stability_random": "stability random"}
# what each figure panel's y axis says (the metric's meaning and units)
AXES = {"tpp": "TPP: probe i's accuracy drop\n− the other probes' (ablated latents)",
        "absorption": "absorption\n(share of the parent's hits absorbed)", "shrinkage": "shrinkage ‖x̂‖ / ‖x‖\n(1: none)",
        "stability": "stability: share of decoder rows\nmatched to the second seed's"}
REFERENCE = {"shrinkage": 1.0}  # a value with a meaning of its own, drawn as a grey line


@dataclass
class Bench:
    """One SAE's SAEBench result: who it is, and its flat metrics."""

    path: Path
    identity: Identity
    architecture: str
    width: int
    entry: dict
    metrics: dict

    @property
    def store(self) -> tuple:
        return (self.identity.model, self.identity.dataset, layer_dir(self.identity.layer))

    @property
    def key(self) -> str:
        return "/".join((*self.store, self.identity.sae))


def probing_ks(metrics: dict) -> list[int]:
    return sorted(int(m.group(1)) for m in map(PROBING.match, metrics) if m)


def metric_order(metrics) -> list[str]:
    """Every metric key, each baseline right after its metric: L0; per k the probe, its floor; the
    ceiling; TPP (its std over classes where given), absorption, stability with their random
    baselines; shrinkage; then any others."""
    order = ["l0"]
    for k in probing_ks(metrics):
        order += [f"sparse_probing_k{k}", f"sparse_probing_floor_k{k}"]
    tpp = [k for k in ("tpp", "tpp_std", "tpp_random", "tpp_random_std") if k not in OPTIONAL or k in metrics]
    order += ["sparse_probing_ceiling", *tpp, *PAIRED[1], "shrinkage", *PAIRED[2]]
    return order + sorted(set(metrics) - set(order))


def label(metric: str) -> str:
    m = re.fullmatch(r"sparse_probing_(floor_)?k(\d+)", metric)
    if m:
        return f"{'floor' if m.group(1) else 'probing'} k={m.group(2)}"
    return LABELS.get(metric, metric.replace("_", " "))


def load_bench(path) -> Bench:
    """One saebench.json, refused in one line if it is not the schema's (naming the file and the key)."""
    from visae.report.collect import read_json

    path = Path(path)
    s = read_json(path, "saebench file")
    missing = [k for k in KEYS if k not in s]
    if missing:
        raise VisaeError(f"saebench file {path} lacks key(s) {', '.join(missing)}: {RERUN}")
    if s["format"] != FORMAT:
        raise VisaeError(f"saebench file {path} is format {s['format']!r}, not {FORMAT!r}: {RERUN}")
    identity = Identity.from_file(s, f"saebench file {path}")
    metrics = s["metrics"]
    if not isinstance(metrics, dict):
        raise VisaeError(f"saebench file {path}: 'metrics' is not an object: {RERUN}")
    ks = probing_ks(metrics)
    need = [*METRICS, *(f"sparse_probing_floor_k{k}" for k in ks)]
    missing = [f"metrics.{k}" for k in need if k not in metrics] + ([] if ks else ["metrics.sparse_probing_k<k>"])
    if missing:
        raise VisaeError(f"saebench file {path} lacks key(s) {', '.join(missing)}: {RERUN}")
    for key, value in metrics.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise VisaeError(f"saebench file {path}: metrics.{key} is {value!r}, not a number or null: {RERUN}")
    if isinstance(s["width"], bool) or not isinstance(s["width"], int) or not isinstance(s["entry"], dict):
        raise VisaeError(f"saebench file {path}: 'width' must be an integer and 'entry' an object: {RERUN}")
    return Bench(path, identity, str(s["architecture"]), s["width"], s["entry"],
                 {k: (None if v is None else float(v)) for k, v in metrics.items()})


def load_benches(paths) -> dict[tuple, list[Bench]]:
    """Every file, grouped by store and sorted (architecture, then sparsity, then name); one SAE twice
    and stores whose SAEs report different probing k's are refused."""
    from visae.report.figures import ARCH_ORDER, natural_key

    if not paths:
        raise VisaeError("no saebench files given (--results)")
    benches = [load_bench(p) for p in paths]
    seen: dict[str, Bench] = {}
    for b in benches:
        if b.key in seen:
            raise VisaeError(f"{seen[b.key].path} and {b.path} are both the SAEBench of {b.key}")
        seen[b.key] = b
    rank = {a: i for i, a in enumerate(ARCH_ORDER)}
    stores: dict[tuple, list[Bench]] = {}
    for b in sorted(benches, key=lambda b: (b.store, rank.get(b.architecture, len(rank)), b.architecture,
                                            natural_key(b.identity.sae))):
        stores.setdefault(b.store, []).append(b)
    for store, group in stores.items():
        ks = {tuple(probing_ks(b.metrics)) for b in group}
        if len(ks) > 1:
            raise VisaeError(f"the SAEBench files of store {'/'.join(store)} report different probing k's "
                             f"({' vs '.join(str(list(k)) for k in sorted(ks))}): rerun them with one --k")
    return dict(sorted(stores.items()))


# -- tables ------------------------------------------------------------------------------------

def store_frame(benches: list[Bench]):
    """One row per SAE: identity, architecture, width, then every metric in `metric_order`."""
    import pandas as pd

    order = metric_order({k for b in benches for k in b.metrics})
    records = [{**b.identity.to_dict(), "architecture": b.architecture, "width": b.width,
                **{k: b.metrics.get(k) for k in order}} for b in benches]
    df = pd.DataFrame.from_records(records)
    for k in order:
        df[k] = df[k].astype("float64")
    return df


def _texts(df) -> dict[str, str]:
    from visae.report.comparison import rounded

    keyed = {"/".join((r["model"], r["dataset"], layer_dir(r["layer"]), r["sae"])):
             {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()
              if k not in ("model", "dataset", "layer", "sae", "store_hash")} for r in df.to_dict("records")}
    shown = rounded(df.drop(columns=["model", "dataset", "layer"]))
    shown = shown.rename(columns={"sae": "SAE", **{c: label(c) for c in shown.columns[3:]}})
    return {
        "md": shown.to_markdown(index=False, disable_numparse=True,
                                colalign=["left", "left"] + ["right"] * (len(shown.columns) - 2)) + "\n",
        "csv": df.to_csv(index=False, na_rep="", lineterminator="\n"),
        "tex": shown.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
        .to_latex(hrules=True, column_format="ll" + "r" * (len(shown.columns) - 2)),
        "json": json.dumps(keyed, indent=2, sort_keys=True) + "\n",
    }


def write_tables(stores: dict[tuple, list[Bench]], out: Path) -> list[Path]:
    """Each store's tables; then any table of the naming pattern this run did not write is deleted
    (a store no longer benched must not linger beside the current ones)."""
    from visae.atomic import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (model, dataset, _), benches in stores.items():
        layer = benches[0].identity.layer
        for ext, text in _texts(store_frame(benches)).items():
            path = out / PurePosixPath(Layout().saebench_table(model, dataset, layer, ext)).name
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
            paths.append(path)
    names = {p.name for p in paths}
    for stale in out.iterdir():
        if stale.is_file() and TABLE.fullmatch(stale.name) and stale.name not in names:
            stale.unlink()
    return paths


def metrics_file(stores: dict[tuple, list[Bench]]) -> dict:
    """DVC's metrics: {"model/dataset/layer_L/sae": {metric: value}}, the nulls left out."""
    return {b.key: {k: v for k, v in b.metrics.items() if v is not None and math.isfinite(v)}
            for benches in stores.values() for b in benches}


# -- figures -----------------------------------------------------------------------------------

def panels(ks: list[int]) -> list[tuple[str, str | None, str | None, str]]:
    """(metric, its baseline, a ceiling, y label) per panel."""
    out = [(f"sparse_probing_k{k}", f"sparse_probing_floor_k{k}", "sparse_probing_ceiling",
            f"{k}-sparse probing\n(balanced accuracy, {k} latent{'s' if k > 1 else ''})") for k in ks]
    out += [(m, b, None, AXES[m]) for m, b in PAIRED[:2]]
    out += [("shrinkage", None, None, AXES["shrinkage"]), ("stability", "stability_random", None, AXES["stability"])]
    return out


def bench_figure(model: str, benches: list[Bench]):
    """Per metric (panels) its value against L0, one line per architecture (and store), its baseline
    dashed in the same colour, the probing ceiling dotted."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from visae.report.figures import _log_axis, _markers, _palette

    ks = sorted({k for b in benches for k in probing_ks(b.metrics)})
    spec = panels(ks)
    ncols = min(4, len(spec))
    nrows = math.ceil(len(spec) / ncols)
    fig = Figure(figsize=(3.3 * ncols + 1.8, 2.9 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
    archs = list(dict.fromkeys(b.architecture for b in benches))
    colours, store_marks = _palette(set(archs)), _markers(set(b.store for b in benches))
    multi = len(store_marks) > 1
    groups: dict[tuple, list[Bench]] = {}
    for b in benches:
        groups.setdefault((b.architecture, b.store), []).append(b)
    for i, (ax, (metric, base, ceiling, ylabel)) in enumerate(zip(axes, spec)):
        drawn = False
        for (arch, store), group in groups.items():
            group = sorted(group, key=lambda b: b.metrics["l0"] if b.metrics.get("l0") is not None else math.inf)
            x = np.array([np.nan if b.metrics.get("l0") is None else b.metrics["l0"] for b in group])
            marker = store_marks[store] if multi else "o"
            for key, style in ((metric, dict(ls="-", lw=1.6, mfc=colours[arch])),
                               (base, dict(ls="--", lw=1.0, mfc="white")),
                               (ceiling, dict(ls=":", lw=1.0, mfc="white", marker="^"))):
                if key is None:
                    continue
                y = np.array([np.nan if b.metrics.get(key) is None else b.metrics[key] for b in group])
                ok = np.isfinite(x) & np.isfinite(y)
                if ok.any():
                    ax.plot(x[ok], y[ok], color=colours[arch], marker=style.pop("marker", marker), ms=5,
                            mec=colours[arch], **style)
                    drawn = True
        if metric in REFERENCE:
            ax.axhline(REFERENCE[metric], color="0.55", lw=0.9)
        if drawn:
            _log_axis(ax.xaxis)
            ax.margins(x=0.12)
        else:
            ax.text(0.5, 0.5, "not measured\n(null for every SAE)", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="0.4")
            ax.set_xticks([])
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("L0 (active latents per token, log)" if i + ncols >= len(spec) else "", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(spec):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colours[a], marker="o", lw=1.6, label=a) for a in archs]
    handles += [Line2D([], [], color="0.3", lw=1.6, marker="o", label="the SAE"),
                Line2D([], [], color="0.3", lw=1.0, ls="--", marker="o", mfc="white",
                       label="its baseline:\nprobing: k random latents\nTPP, absorption: random latents\n"
                             "stability: a random decoder"),
                Line2D([], [], color="0.3", lw=1.0, ls=":", marker="^", mfc="white",
                       label="probing ceiling:\nthe model's activations")]
    if multi:
        handles += [Line2D([], [], color="0.3", ls="", marker=m, label=" · ".join(s[1:]) if len(s) > 1 else s[0])
                    for s, m in store_marks.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7.5, frameon=False)
    fig.suptitle(f"{model}: vision SAEBench, each metric against sparsity, per architecture "
                 f"(dashed: the metric's baseline)", fontsize=10)
    return fig


def write_figures(stores: dict[tuple, list[Bench]], out: Path) -> list[Path]:
    from visae.report.figures import by_model, save_figure, theme

    out.mkdir(parents=True, exist_ok=True)
    benches = [b for group in stores.values() for b in group]
    paths = []
    with theme():
        for model, group in by_model(benches, lambda b: b.identity.model).items():
            stem = PurePosixPath(Layout().saebench_figure(model, "png")).stem
            paths += save_figure(bench_figure(model, group), out, stem)
    return paths


# -- the command -------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--results", nargs="+", required=True, metavar="SAEBENCH_JSON",
                        help="saebench.json files written by `visae saebench`")
    parser.add_argument("--tables", required=True, help="output folder of the per-store tables")
    parser.add_argument("--figures", required=True, help="output folder of the per-model figures")
    parser.add_argument("--metrics-file", required=True, help="DVC's metrics file to write (JSON)")


def run(args) -> int:
    from visae.atomic import atomic_path, clean_stale_temps, write_json
    from visae.layout import RUN_MARKER
    from visae.provenance import provenance

    started = time.time()
    tables, figures, metrics = Path(args.tables), Path(args.figures), Path(args.metrics_file)
    for folder in (tables, figures):  # not the metrics file's folder: it holds every SAE's SAEBench
        clean_stale_temps(folder)
    stores = load_benches(args.results)  # everything checked before anything is written
    written = write_tables(stores, tables)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(metrics) as tmp:
        tmp.write_text(json.dumps(metrics_file(stores), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written += [metrics, *write_figures(stores, figures)]
    config = {"command": "report saebench", "results": [str(p) for p in args.results]}
    write_json(figures / RUN_MARKER, provenance(config, seeds={}, started=started))
    n = sum(len(group) for group in stores.values())
    print(f"{n} SAE(s) in {len(stores)} store(s) -> {len(written)} file(s) in {tables}, {figures}, {metrics}")
    return 0

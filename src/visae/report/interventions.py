"""The interventions' tables and figures: each edit's effect next to its baselines.

`visae intervene` writes one folder per (task, model, dataset, layer, SAE); this report reads only
those folders (intervention.json, classes.csv, dose.csv, examples.safetensors) and writes, per task:
- `<task>.{md,csv,tex,json}`: one row per folder, the probe's score next to its random-init score,
  then per method its headline as mean ± std over classes (csv and json: full precision, the mean
  and std in columns of their own; md and tex: rounded), and the finding sentence;
- per model, `dose_<task>_<model>` (the headline against the edit's scale, one line per method with
  a ± std band) and `example_<task>_<model>` (the paper's figure: an image, the latent's patch
  heatmap, the task head's output before and after the edit), one panel per folder of that model.
A folder with a file or a key missing is refused in one line before anything is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from safetensors import SafetensorError, safe_open

from visae.atomic import atomic_path
from visae.errors import VisaeError
from visae.layout import (INTERVENTION, INTERVENTION_CLASSES, INTERVENTION_DOSE, INTERVENTION_EXAMPLES, TASKS,
                          Layout, layer_dir)
from visae.report.collect import read_csv, read_json
from visae.report.comparison import heat_overlay, rounded
from visae.report.figures import by_model, save_figure, theme  # also selects the Agg backend

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import seaborn as sns  # noqa: E402

RERUN = "rerun `visae intervene`"
KEYS = ("task", "identity", "model", "dataset", "layer", "sae", "probe", "methods", "n_classes", "n_images",
        "scales", "finding")
PROBE_KEYS = ("metric", "test_score", "random_init_score")
FINDING_KEYS = ("moves_more_than_baselines", "text")


@dataclass(frozen=True)
class Task:
    """What one task's files hold: its keys, headline metrics, dose curves and example tensors."""

    keys: tuple[str, ...]
    headlines: tuple[tuple[str, str], ...]  # (block of intervention.json, metric): the table's columns
    scale_keys: tuple[str, ...]  # the edit's scales, as table columns
    before: tuple[str, str]  # (key, header): the probe on unedited images
    classes_columns: tuple[str, ...]
    dose_curves: tuple[tuple[str, str], ...]  # (dose.csv column stem, y label): one row of panels each
    dose_scale: str  # the key of the scale the table's numbers are at
    example_tensors: tuple[str, ...]


COMMON_TENSORS = ("image", "heatmap", "class", "latent")
TASK_SPECS = {
    "classification": Task(
        keys=("suppress_scale", "insert_scale", "tokens", "suppression", "insertion", "accuracy_before"),
        headlines=(("suppression", "delta_prob"), ("suppression", "delta_acc"), ("suppression", "other_delta_acc"),
                   ("insertion", "flip_rate")),
        scale_keys=("suppress_scale", "insert_scale"),
        before=("accuracy_before", "acc. before"),
        classes_columns=("class", "class_name", "method", "latent", "n_images", "p_before", "p_after", "delta_prob",
                         "acc_before", "acc_after", "delta_acc", "other_acc_before", "other_acc_after",
                         "other_delta_acc", "flip_rate"),
        dose_curves=(("delta_prob", "change of the class's probability\n(after − before the edit)"),),
        dose_scale="suppress_scale",
        example_tensors=COMMON_TENSORS + ("probs_before", "probs_after")),
    "segmentation": Task(
        keys=("scale", "thresholds", "mode", "rates", "miou_before"),
        headlines=(("rates", "target_change"), ("rates", "other_change"), ("rates", "miou_after")),
        scale_keys=("scale",),
        before=("miou_before", "mIoU before"),
        classes_columns=("class", "class_name", "method", "latent", "f1", "threshold", "n_target_patches",
                         "target_change", "other_change", "miou_after"),
        dose_curves=(("target_change", "target change rate\n(the class's patches that change)"),
                     ("other_change", "other change rate\n(all other patches that change)")),
        dose_scale="scale",
        example_tensors=COMMON_TENSORS + ("pred_before", "pred_after")),
}
# Methods in a fixed colour each; the chosen latents drawn boldest.
METHOD_ORDER = ("latent", "manual", "random_latent", "random_direction", "probe_direction")
CHOSEN = ("latent", "manual")
KEY_COLUMNS = ["model", "dataset", "layer", "sae"]


@dataclass
class Result:
    """One intervention folder: its summary, dose-response rows and the path it came from."""

    path: Path
    summary: dict
    dose: pd.DataFrame

    @property
    def task(self) -> str:
        return self.summary["task"]

    @property
    def key(self) -> tuple:
        s = self.summary
        return (s["model"], s["dataset"], layer_dir(s["layer"]), s["sae"])

    @property
    def label(self) -> str:
        s = self.summary
        return f"{s['sae']} · layer {s['layer']} · {s['dataset']}"

    @property
    def examples(self) -> Path:
        return self.path.parent / INTERVENTION_EXAMPLES


def _missing(block: dict, keys) -> list[str]:
    return [k for k in keys if k not in block]


def load_result(path: str | Path) -> Result:
    """An intervention folder's files, refused in one line when one is missing or lacks a key."""
    path = Path(path)
    folder = path.parent
    absent = [name for name in (INTERVENTION, INTERVENTION_CLASSES, INTERVENTION_DOSE, INTERVENTION_EXAMPLES)
              if not (folder / name).is_file()]
    if absent:
        raise VisaeError(f"intervention folder {folder} lacks {', '.join(absent)}: {RERUN}")
    s = read_json(path, "intervention file")
    spec = TASK_SPECS.get(s.get("task"))
    if spec is None and "task" in s:
        raise VisaeError(f"intervention file {path}: task {s['task']!r} is none of {', '.join(TASKS)}")
    missing = _missing(s, KEYS + (spec.keys if spec else ()))
    missing += [f"probe.{k}" for k in _missing(s.get("probe") or {}, PROBE_KEYS)]
    missing += [f"finding.{k}" for k in _missing(s.get("finding") or {}, FINDING_KEYS)]
    if missing:
        raise VisaeError(f"intervention file {path} lacks key(s) {', '.join(missing)}: {RERUN}")
    curves = [f"{stem}_{stat}" for stem, _ in spec.dose_curves for stat in ("mean", "std")]
    dose = read_csv(folder / INTERVENTION_DOSE, "dose file", ("scale", *curves), text=("method",))
    classes = read_csv(folder / INTERVENTION_CLASSES, "classes file", ())
    absent = _missing(set(classes.columns), spec.classes_columns)
    if absent:
        raise VisaeError(f"classes file {folder / INTERVENTION_CLASSES} lacks column(s) {', '.join(absent)}: {RERUN}")
    try:
        with safe_open(str(folder / INTERVENTION_EXAMPLES), "numpy") as f:
            absent = _missing(set(f.keys()), spec.example_tensors) + \
                [f"metadata {k}" for k in _missing(f.metadata() or {}, ("classes", "task"))]
            if not absent and not f.get_slice("class").get_shape()[0]:
                absent = ["examples (it holds none)"]
    except SafetensorError as err:
        raise VisaeError(f"examples file {folder / INTERVENTION_EXAMPLES} is not readable ({err}): {RERUN}") from None
    if absent:
        raise VisaeError(f"examples file {folder / INTERVENTION_EXAMPLES} lacks {', '.join(absent)}: {RERUN}")
    return Result(path, s, dose)


def load_results(paths) -> dict[str, list[Result]]:
    """Every folder, grouped by task and sorted by (model, dataset, layer, SAE); duplicates refused."""
    if not paths:
        raise VisaeError("no intervention files given (--results)")
    by_task: dict[str, list[Result]] = {}
    for r in (load_result(p) for p in paths):
        by_task.setdefault(r.task, []).append(r)
    for task, results in by_task.items():
        results.sort(key=lambda r: r.key)
        for a, b in zip(results, results[1:]):
            if a.key == b.key:
                raise VisaeError(f"{a.path} and {b.path} are both {task} on {'/'.join(a.key)}")
    return {task: by_task[task] for task in TASKS if task in by_task}


# -- tables ------------------------------------------------------------------------------------

def _number(value) -> float:
    return math.nan if value is None else float(value)


def _methods(results: list[Result]) -> list[str]:
    """Every method of these folders, in their table order (first seen first)."""
    return list(dict.fromkeys(m for r in results for m in r.summary["methods"]))


def task_frame(task: str, results: list[Result]) -> pd.DataFrame:
    """One row per folder, full precision: identity, probe scores, each method's mean and std, the finding."""
    spec = TASK_SPECS[task]
    records = []
    for r in results:
        s = r.summary
        row = {"model": s["model"], "dataset": s["dataset"], "layer": s["layer"], "sae": s["sae"],
               "sae_dataset": s["identity"].get("dataset"), "store_hash": s["identity"].get("store_hash"),
               "n_classes": s["n_classes"], "n_images": s["n_images"],
               **{k: _number(s[k]) for k in spec.scale_keys},
               "probe_metric": s["probe"]["metric"], "probe_score": _number(s["probe"]["test_score"]),
               "random_init_score": _number(s["probe"]["random_init_score"]),
               spec.before[0]: _number(s[spec.before[0]])}
        for method in _methods(results):
            for block, metric in spec.headlines:
                stats = (s[block].get(method) or {}).get(metric) or {}
                for stat in ("mean", "std"):
                    row[f"{method}_{metric}_{stat}"] = _number(stats.get(stat))
        row["moves_more_than_baselines"] = bool(s["finding"]["moves_more_than_baselines"])
        row["finding"] = s["finding"]["text"]
        records.append(row)
    return pd.DataFrame.from_records(records)


def _plus_minus(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.3f} ± {'-' if math.isnan(std) else f'{std:.3f}'}"


def shown_frame(task: str, df: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """The Markdown / LaTeX view: rounded as the comparison tables are, each headline as mean ± std."""
    spec = TASK_SPECS[task]
    out = df.drop(columns=[c for c in df.columns if c.endswith(("_mean", "_std"))])
    for method in methods:
        for _, metric in spec.headlines:
            out[f"{method} {metric}"] = [_plus_minus(m, s) for m, s in
                                         zip(df[f"{method}_{metric}_mean"], df[f"{method}_{metric}_std"])]
    for col in ("moves_more_than_baselines", "finding"):
        out[col] = out.pop(col)
    return rounded(out.rename(columns={"probe_metric": "metric", "probe_score": "probe",
                                        "random_init_score": "random init", spec.before[0]: spec.before[1],
                                        "moves_more_than_baselines": "moves more"}))


def write_task_table(task: str, results: list[Result], out: Path) -> list[Path]:
    """`<task>.csv` and `.json` (full precision; json keyed by model/dataset/layer/sae), `.md` and `.tex`."""
    df = task_frame(task, results)
    shown = shown_frame(task, df, _methods(results))
    keyed = {"/".join(str(v) for v in (r["model"], r["dataset"], layer_dir(r["layer"]), r["sae"])):
             {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k not in KEY_COLUMNS}
             for r in df.to_dict("records")}
    texts = {
        "md": shown.to_markdown(index=False, disable_numparse=True) + "\n",
        "csv": df.to_csv(index=False, na_rep="", lineterminator="\n"),
        "tex": shown.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
        .to_latex(hrules=True).replace("±", r"$\pm$"),
        "json": json.dumps(keyed, indent=2, sort_keys=True, default=str) + "\n",
    }
    paths = []
    for ext, text in texts.items():
        path = out / PurePosixPath(Layout().intervention_table(task, ext)).name
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


# -- figures -----------------------------------------------------------------------------------

METHOD_LABELS = {"latent": "chosen latent", "manual": "latent chosen by hand",
                 "random_latent": "random latent, matched frequency", "random_direction": "random direction",
                 "probe_direction": "the probe's own direction"}


def _style(method: str) -> dict:
    """Colour and weight of a method's line: the chosen latents bold and on top, baselines thin."""
    colours = sns.color_palette("colorblind", len(METHOD_ORDER) + 1)
    colour = colours[METHOD_ORDER.index(method)] if method in METHOD_ORDER else colours[-1]
    if method in CHOSEN:
        return {"color": colour, "lw": 2.6, "zorder": 4, "alpha": 1.0, "band": 0.25}
    return {"color": colour, "lw": 1.2, "zorder": 2, "alpha": 0.8, "band": 0.10,
            "ls": ":" if method == "probe_direction" else "--"}


def dose_figure(task: str, model: str, results: list[Result]) -> Figure:
    """Per folder (columns) and curve (rows): the headline's mean over classes against the scale,
    one line per method with a ± std band."""
    spec = TASK_SPECS[task]
    rows = len(spec.dose_curves)
    fig = Figure(figsize=(4.6 * len(results) + 2.6, 3.0 * rows + 0.7), layout="constrained")
    axes = fig.subplots(rows, len(results), squeeze=False, sharex="col")
    for col, r in enumerate(results):
        for row, (stem, ylabel) in enumerate(spec.dose_curves):
            ax = axes[row][col]
            for method in r.summary["methods"]:
                sub = r.dose[r.dose.method == method].sort_values("scale", kind="stable")
                if sub.empty:
                    continue
                x, m, s = (sub[c].to_numpy(dtype=float) for c in ("scale", f"{stem}_mean", f"{stem}_std"))
                st = _style(method)
                ax.plot(x, m, marker="o", ms=3, label=METHOD_LABELS.get(method, method), color=st["color"], lw=st["lw"], zorder=st["zorder"],
                        alpha=st["alpha"], ls=st.get("ls", "-"))
                ax.fill_between(x, m - np.nan_to_num(s), m + np.nan_to_num(s), color=st["color"], alpha=st["band"],
                                lw=0, zorder=st["zorder"] - 1)
            ax.axvline(float(r.summary[spec.dose_scale]), color="0.5", lw=0.9, ls="-.",
                       label="the table's scale")
            ax.axhline(0.0, color="0.3", lw=0.6)
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(r.label, fontsize=9)
            if row == rows - 1:
                ax.set_xlabel("scale\n(the latent set to scale × its maximum activation)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(f"{model}: {task}, the chosen latent's edit against its baselines\n(mean ± std over classes)",
                 fontsize=10)
    return fig


def _read_examples(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["classes"])


def _classification_panel(sub, arrays: dict, classes: list[str], title: str, top: int = 5) -> None:
    n = len(arrays["class"])
    axes = sub.subplots(n, 3, squeeze=False, width_ratios=[1, 1, 1.8])
    for i in range(n):
        image, heat = arrays["image"][i], arrays["heatmap"][i]
        before, after = arrays["probs_before"][i].astype(float), arrays["probs_after"][i].astype(float)
        axes[i][0].imshow(image)
        axes[i][0].set_title(f"{classes[int(arrays['class'][i])]}", fontsize=7, loc="left")
        heat_overlay(axes[i][1], image, heat)
        axes[i][1].set_title(f"latent #{int(arrays['latent'][i])}", fontsize=7, loc="left")
        order = np.argsort(-before, kind="stable")[:top]
        y = np.arange(len(order))
        ax = axes[i][2]
        ax.barh(y - 0.2, before[order], 0.4, color="0.55", label="before")
        ax.barh(y + 0.2, after[order], 0.4, color=sns.color_palette("colorblind")[1], label="after")
        ax.set_yticks(y, [classes[c] for c in order], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=6)
        if i == 0:
            ax.legend(fontsize=6, loc="lower right", frameon=False)
        if i == n - 1:
            ax.set_xlabel("probability (top 5 before the edit)", fontsize=7)
        for a in axes[i][:2]:
            a.set_axis_off()
    sub.suptitle(title, fontsize=8)


def class_colours(classes: list[str]) -> list:
    """One distinct colour per class, the background dark grey (so that garments stand out)."""
    objects = [c for c in classes if c.lower() != "background"]
    palette = iter(sns.color_palette("tab10" if len(objects) <= 10 else "husl", len(objects)))
    return [(0.22, 0.22, 0.22) if c.lower() == "background" else next(palette) for c in classes]


def _segmentation_panel(sub, arrays: dict, classes: list[str], title: str) -> None:
    n = len(arrays["class"])
    axes = sub.subplots(n, 4, squeeze=False)
    cmap = ListedColormap(class_colours(classes))
    shown = set()
    for i in range(n):
        image = arrays["image"][i]
        heat_overlay(axes[i][1], image, arrays["heatmap"][i])
        axes[i][0].imshow(image)
        for col, key in ((2, "pred_before"), (3, "pred_after")):
            pred = arrays[key][i]
            shown |= set(np.unique(pred).tolist())
            axes[i][col].imshow(pred, cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5, interpolation="nearest")
        heads = (classes[int(arrays["class"][i])], f"latent #{int(arrays['latent'][i])}", "before", "after")
        for a, head in zip(axes[i], heads):
            a.set_axis_off()
            a.set_title(head, fontsize=7, loc="left")
    handles = [Patch(color=cmap(c), label=classes[c]) for c in sorted(shown) if 0 <= c < len(classes)]
    sub.legend(handles=handles, loc="outside lower center", ncol=min(4, max(1, len(handles))), fontsize=6,
               frameon=False)
    sub.suptitle(title, fontsize=8)


def example_figure(task: str, model: str, results: list[Result]) -> Figure:
    """Per folder: each stored example with the latent's heatmap and the task head's output before
    and after the edit (classification: top-5 probabilities; segmentation: the predicted classes)."""
    loaded = [_read_examples(r.examples) for r in results]
    n = max(len(a["class"]) for a, _ in loaded)
    width = 6.4 if task == "classification" else 6.0
    fig = Figure(figsize=(width * len(results), 1.6 * n + 1.2), layout="constrained")
    subs = fig.subfigures(1, len(results), squeeze=False)[0]
    draw = _classification_panel if task == "classification" else _segmentation_panel
    for sub, r, (arrays, classes) in zip(subs, results, loaded):
        scale = r.summary[TASK_SPECS[task].dose_scale]
        draw(sub, arrays, classes, f"{r.label}: the latent set to {scale:g} × its maximum")
    fig.suptitle(f"{model}: {task}, the chosen latent edited", fontsize=10)
    return fig


def write_interventions(paths, tables_out, figures_out) -> list[Path]:
    """Every task's table and figures; returns the files written."""
    by_task = load_results(paths)
    tables_out, figures_out = Path(tables_out), Path(figures_out)
    tables_out.mkdir(parents=True, exist_ok=True)
    figures_out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for task, results in by_task.items():
        written += write_task_table(task, results, tables_out)
    with theme():
        for task, results in by_task.items():
            for model, group in by_model(results, lambda r: r.summary["model"]).items():
                for kind, draw in (("dose", dose_figure), ("example", example_figure)):
                    stem = PurePosixPath(Layout().intervention_figure(kind, task, model, "png")).stem
                    written += save_figure(draw(task, model, group), figures_out, stem)
    return written

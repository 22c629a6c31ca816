"""The SAE figures: per model the L0-vs-NMSE frontier, latent-frequency histograms and training
curves, and `frontier_all` (every model's SAEs on one frontier); `theme()`, the one look every
report figure (comparison, interventions, SAEBench) is drawn in.

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot state) with the Agg backend,
under fixed rcParams, and saved without timestamps, so the same inputs give the same PNG/PDF bytes.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from visae.atomic import atomic_path  # noqa: E402
from visae.errors import VisaeError  # noqa: E402
from visae.layout import ALL_MODELS, SEED_TWIN, figure_name, model_slug  # noqa: E402
from visae.report.collect import Row  # noqa: E402

ARCH_ORDER = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]
MARKERS = ["o", "s", "^", "D", "P", "X", "v"]  # one per architecture, in ARCH_ORDER
DENSE_THRESHOLD = 0.01  # visae.analysis.evaluate's: a latent firing on more than 1% of tokens is dense
DEFAULT_EDGES = [float(e) for e in np.arange(-8.0, 0.01, 0.5)]
DPI = 150
GROUP = "data · layer"
# Reproducible output: fixed hash salt and fonts, no timestamps (CreationDate is dropped at save time).
RC = {
    "svg.hashsalt": "visae",
    "svg.fonttype": "path",
    "pdf.fonttype": 3,
    "pdf.compression": 6,
    "font.family": "DejaVu Sans",
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "path.simplify": True,
}
PNG_METADATA = {"Software": "visae report (matplotlib, Agg)"}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Creator": "visae report", "Producer": "matplotlib"}


def _palette(archs) -> dict[str, tuple]:
    """One fixed colour per architecture, the same in every figure."""
    known = [a for a in ARCH_ORDER if a in archs] + sorted(a for a in archs if a not in ARCH_ORDER)
    colours = sns.color_palette("colorblind", max(10, len(ARCH_ORDER) + len(known)))
    fixed = {a: colours[i] for i, a in enumerate(ARCH_ORDER)}
    extra = iter(colours[len(ARCH_ORDER):])
    return {a: fixed[a] if a in fixed else next(extra) for a in known}


def _markers(archs) -> dict[str, str]:
    known = [a for a in ARCH_ORDER if a in archs] + sorted(a for a in archs if a not in ARCH_ORDER)
    return {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(known)}


@contextmanager
def theme():
    """The report's one look (seaborn whitegrid, paper context, colorblind palette) under the fixed
    rcParams that make the bytes reproducible; every report figure is drawn inside it."""
    with matplotlib.rc_context(), sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15):
        matplotlib.rcParams.update(RC)
        matplotlib.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=sns.color_palette("colorblind"))
        yield


def save_figure(fig: Figure, out: Path, stem: str) -> list[Path]:
    paths = []
    for ext, meta in (("png", PNG_METADATA), ("pdf", PDF_METADATA)):
        path = out / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI, metadata=meta, bbox_inches=None)
        paths.append(path)
    return paths


def _log_axis(axis) -> None:
    """Log scale with plain-number labels at 1, 2, 5 × 10^n."""
    axis.axes.set_xscale("log") if axis.axis_name == "x" else axis.axes.set_yscale("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def label_points(ax, xs, ys, texts, fontsize: float = 7.0) -> None:
    """Name each point with a label placed beside it where it overlaps no other label or point
    (greedy, in display space; the candidates are right, left, above and below the point)."""
    ax.autoscale_view()
    pts = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    scale = ax.figure.dpi / 72.0  # points -> pixels
    h = fontsize * 1.25 * scale
    placed: list[tuple[float, float, float, float]] = []
    marker = 4.5 * scale
    points = [(x - marker, y - marker, x + marker, y + marker) for x, y in pts]

    def overlap(a, b) -> float:
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    for i in np.lexsort((pts[:, 1], pts[:, 0])):
        (x, y), text = pts[i], str(texts[i])
        w = 0.58 * fontsize * len(text) * scale
        candidates = [(6, 2), (6, -h / scale + 2), (-6 - w / scale, 2), (-6 - w / scale, -h / scale + 2),
                      (-w / scale / 2, 7), (-w / scale / 2, -h / scale - 7), (6, h / scale + 2),
                      (6, -2 * h / scale + 2)]
        best, best_cost = candidates[0], math.inf
        for dx, dy in candidates:
            box = (x + dx * scale, y + dy * scale, x + dx * scale + w, y + dy * scale + h)
            cost = sum(overlap(box, b) for b in placed) + sum(overlap(box, p) for j, p in enumerate(points) if j != i)
            if cost < best_cost - 1e-9:
                best, best_cost = (dx, dy), cost
            if cost == 0:
                break
        dx, dy = best
        placed.append((x + dx * scale, y + dy * scale, x + dx * scale + w, y + dy * scale + h))
        ax.annotate(text, (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    va="bottom", ha="left", color="0.2")


def natural_key(name: str) -> list:
    """Sort key reading the numbers in a name as numbers: topk-8 before topk-16."""
    return [(0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part)
            for part in re.split(r"(\d+(?:\.\d+)?)", name) if part]


def point_labels(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """One label per point, except that an SAE and its seed twin (same `by` values) share one,
    "<sae> (2 seeds)", at their midpoint: the two nearly coincide."""
    rows = []
    for _, sub in df.groupby(by, sort=True):
        names = set(sub["sae"])
        for r in sub.itertuples():
            if r.sae.endswith(SEED_TWIN) and r.sae[:-len(SEED_TWIN)] in names:
                continue
            twin = sub[sub["sae"] == r.sae + SEED_TWIN]
            if len(twin):
                rows.append((np.sqrt(r.l0 * twin["l0"].iloc[0]), (r.nmse + twin["nmse"].iloc[0]) / 2,
                             f"{r.sae} (2 seeds)"))
            else:
                rows.append((r.l0, r.nmse, r.sae))
    return pd.DataFrame(rows, columns=["l0", "nmse", "label"])


def _group(r: Row) -> str:
    return f"{r.dataset} · layer {r.layer}"


def sae_order(rows: list[Row]) -> list[Row]:
    """Architecture, then sparsity (k or λ), then name: seed twins beside their SAE."""
    rank = {a: i for i, a in enumerate(ARCH_ORDER)}

    def key(r: Row):
        setting = r.k if r.k is not None else (r.lam if r.lam is not None else math.inf)
        return (_group(r), rank.get(r.architecture, len(rank)), r.architecture, setting, r.sae)

    return sorted(rows, key=key)


def _frontier_frame(rows: list[Row], hue) -> pd.DataFrame:
    return pd.DataFrame({"sae": [r.sae for r in rows], "architecture": [r.architecture for r in rows],
                         "l0": [r.l0 for r in rows], "nmse": [r.nmse for r in rows], GROUP: [_group(r) for r in rows],
                         "hue": [hue(r) for r in rows]})


def _frontier_axes(ax) -> None:
    _log_axis(ax.xaxis)
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("L0: active latents per token (log scale)")
    ax.set_ylabel("NMSE on held-out tokens\n(‖x − x̂‖² / ‖x − mean‖²)")


def frontier_figure(model: str, rows: list[Row]) -> Figure:
    """NMSE against L0, one point per SAE, coloured by architecture (lower left is better)."""
    df = _frontier_frame(rows, lambda r: r.architecture)
    palette, markers = _palette(set(df["architecture"])), _markers(set(df["architecture"]))
    multi = df[GROUP].nunique() > 1
    fig = Figure(figsize=(6.8, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for (arch, group), sub in df.groupby(["architecture", GROUP], sort=True):
        sub = sub.sort_values(["l0", "sae"])
        ax.plot(sub["l0"], sub["nmse"], color=palette[arch], alpha=0.45, linewidth=1.2, zorder=1)
    sns.scatterplot(data=df, x="l0", y="nmse", hue="architecture", hue_order=list(palette), palette=palette,
                    style=GROUP if multi else "architecture", markers=None if multi else markers,
                    style_order=None if multi else list(markers), s=70, ax=ax, zorder=2, legend="full",
                    edgecolor="white", linewidth=0.6)
    _frontier_axes(ax)
    labels = point_labels(df, ["architecture", GROUP])
    label_points(ax, labels["l0"].to_numpy(), labels["nmse"].to_numpy(), labels["label"].tolist())
    ax.set_title(f"{model}: reconstruction error against sparsity, per SAE (lower left is better)", fontsize=10)
    ax.legend(title=None if multi else "architecture", fontsize=8, title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def frontier_all_figure(rows: list[Row]) -> Figure:
    """Every SAE of every model on one L0-NMSE plot: colour = model, marker = architecture, one
    line per (model, architecture) through its SAEs in order of L0."""
    multi = len({_group(r) for r in rows}) > 1
    df = _frontier_frame(rows, lambda r: r.model + (f" ({_group(r)})" if multi else ""))
    models = sorted(df["hue"].unique())
    colours = dict(zip(models, sns.color_palette("dark", len(models)) if len(models) <= 10
                       else sns.color_palette("husl", len(models))))
    markers = _markers(set(df["architecture"]))
    fig = Figure(figsize=(8.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for (hue, arch), sub in df.groupby(["hue", "architecture"], sort=True):
        sub = sub.sort_values(["l0", "sae"])
        ax.plot(sub["l0"], sub["nmse"], color=colours[hue], alpha=0.45, linewidth=1.2, zorder=1,
                linestyle="-" if list(markers).index(arch) % 2 == 0 else "--")
    sns.scatterplot(data=df, x="l0", y="nmse", hue="hue", hue_order=models, palette=colours, style="architecture",
                    style_order=list(markers), markers=markers, s=70, ax=ax, zorder=2, legend="full",
                    edgecolor="white", linewidth=0.6)
    _frontier_axes(ax)
    labels = point_labels(df, ["hue", "architecture"])
    label_points(ax, labels["l0"].to_numpy(), labels["nmse"].to_numpy(), labels["label"].tolist(), fontsize=6.5)
    handles, labels = ax.get_legend_handles_labels()
    labels = ["model" if lb == "hue" else lb for lb in labels]
    legend = ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for text in legend.get_texts():
        if text.get_text() in ("model", "architecture"):  # seaborn's section headings
            text.set_fontweight("bold")
    ax.set_title(f"Every model's SAEs: reconstruction error against sparsity ({len(rows)} SAEs, lower left is better)",
                 fontsize=10)
    return fig


def _hist_edges(r: Row) -> list[float]:
    if r.hist and isinstance(r.hist.get("edges"), list) and len(r.hist["edges"]) > 1:
        return [float(e) for e in r.hist["edges"]]
    return DEFAULT_EDGES


def check_histograms(rows: list[Row], freqs: dict[tuple, np.ndarray]) -> None:
    """Every row needs a latents.csv or a usable log10_freq_hist: checked before anything is drawn."""
    for r in rows:
        if r.key in freqs:
            continue
        counts = (r.hist or {}).get("counts")
        if not isinstance(counts, list) or len(counts) != len(_hist_edges(r)) - 1 or \
                not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in counts):
            raise VisaeError(f"metrics file {r.path} lacks a usable 'log10_freq_hist' and no --latents file "
                             f"was given for it")


def _histogram(r: Row, freqs: dict[tuple, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[float], int]:
    """(log10 frequencies or bin centres, their weights, bin edges, dead latents) of one SAE."""
    edges = _hist_edges(r)
    if r.key in freqs:
        f = freqs[r.key]
        fired = f[f > 0]
        x = np.clip(np.log10(fired), edges[0], edges[-1])
        return x, np.ones_like(x), edges, int((f == 0).sum())
    counts = np.asarray(r.hist["counts"], dtype=float)
    x = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
    return x, counts, edges, int(r.hist.get("never_fired", round(r.dead_fraction * r.width)))


def latent_freq_figure(model: str, rows: list[Row], freqs: dict[tuple, np.ndarray]) -> Figure:
    """Per SAE, a histogram of its latents' firing frequency on held-out tokens, beside the dense
    threshold; dead latents (never fired) are counted in the corner."""
    rows = sae_order(rows)
    multi = len({_group(r) for r in rows}) > 1
    palette = _palette({r.architecture for r in rows})
    hists = [_histogram(r, freqs) for r in rows]
    lows = [x[w > 0].min() for x, w, _, _ in hists if (w > 0).any()]
    lo = math.floor(min(lows)) - 0.5 if lows else DEFAULT_EDGES[0]
    n = len(rows)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.9 * ncols + 0.4, 2.35 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    for i, (ax, r, (x, weights, edges, dead)) in enumerate(zip(axes, rows, hists)):
        ax.hist(x, weights=weights, bins=edges, color=palette[r.architecture], alpha=0.85, edgecolor="white",
                linewidth=0.4)
        ax.axvline(math.log10(DENSE_THRESHOLD), color="0.3", linestyle="--", linewidth=0.9)
        ax.set_title(f"{r.sae}\nL0 {r.l0:.1f}, dead {dead}/{r.width}" + (f", {_group(r)}" if multi else ""),
                     fontsize=8.5)
        ax.set_xlim(lo, edges[-1] + 0.1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"$10^{{{v:g}}}$" if float(v).is_integer() else ""))
        bottom = i + ncols >= n  # the lowest panel of its column
        ax.set_xlabel("firing frequency (fraction of tokens)" if bottom else "", fontsize=8)
        ax.tick_params(axis="x", labelbottom=bottom)
        ax.set_ylabel("latents", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{model}: how often each latent fires on held-out tokens, per SAE "
                 f"(dashed: the dense threshold, {DENSE_THRESHOLD:.0%} of tokens)", fontsize=10)
    return fig


def _shades(colour, n: int) -> list:
    """n shades of one colour, light to dark (the colour itself when n is 1)."""
    if n == 1:
        return [colour]
    c = np.asarray(colour)
    return sns.blend_palette([0.45 * c + 0.55, c, 0.55 * c], n)


def _tokens(v, _) -> str:
    return "0" if v == 0 else (f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k")


def training_figure(model: str, logs: list[tuple[dict, pd.DataFrame]]) -> Figure:
    """Training MSE and L0 against tokens seen, one line per SAE: a colour per SAE, shades of its
    architecture's hue, the seed twin dashed in its SAE's colour."""
    multi = len({(i["dataset"], i["layer"]) for i, _ in logs}) > 1
    frames, arch_of = [], {}
    for ident, df in logs:
        label = ident["sae"] + (f" ({ident['dataset']} · layer {ident['layer']})" if multi else "")
        arch_of[label] = ident["architecture"]
        frames.append(pd.DataFrame({"tokens": df["tokens"].to_numpy(), "mse": df["mse"].to_numpy(),
                                    "l0": df["l0"].to_numpy(), "SAE": label}))
    data = pd.concat(frames, ignore_index=True)
    order = sorted(data["SAE"].unique(), key=lambda s: (ARCH_ORDER.index(arch_of[s]) if arch_of[s] in ARCH_ORDER
                                                        else len(ARCH_ORDER), arch_of[s], natural_key(s)))
    base = {s: s.replace(SEED_TWIN, "") for s in order}
    colours, dashes = {}, {}
    arch_palette = _palette(set(arch_of.values()))
    for arch in dict.fromkeys(arch_of[s] for s in order):
        bases = list(dict.fromkeys(base[s] for s in order if arch_of[s] == arch))
        for b, colour in zip(bases, _shades(arch_palette[arch], len(bases))):
            for s in order:
                if base[s] == b:
                    colours[s], dashes[s] = colour, (4, 2) if s != b else ""
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, col, label in ((axes[0], "mse", "training MSE (normalised units, log)"),
                           (axes[1], "l0", "L0: active latents per token (log)")):
        sns.lineplot(data=data, x="tokens", y=col, hue="SAE", hue_order=order, palette=colours, style="SAE",
                     style_order=order, dashes=dashes, ax=ax, linewidth=1.1, legend=ax is axes[1],
                     estimator=None, sort=False)
        _log_axis(ax.yaxis)
        ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
        ax.set_xlabel("training tokens seen")
        ax.set_ylabel(label)
    axes[1].legend(title="SAE", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   frameon=False)
    fig.suptitle(f"{model}: SAE training curves (per training batch; dashed: second seed)", fontsize=10)
    return fig


def by_model(items, model_of) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(model_of(item), []).append(item)
    slugs: dict[str, str] = {}
    for model in groups:
        other = slugs.setdefault(model_slug(model), model)
        if other != model:
            raise VisaeError(f"models {other!r} and {model!r} would share figure file names ({model_slug(model)})")
    return dict(sorted(groups.items()))


def write_figures(rows: list[Row], out: str | Path, freqs: dict[tuple, np.ndarray] | None = None,
                  logs: list[tuple[dict, pd.DataFrame]] | None = None) -> list[Path]:
    """Write every figure under `out`; return the paths written, in order."""
    freqs = freqs or {}
    check_histograms(rows, freqs)
    groups = by_model(rows, lambda r: r.model)
    if ALL_MODELS in {model_slug(m) for m in groups}:
        raise VisaeError(f"a model named {ALL_MODELS!r} would share its figure names with the all-model figures "
                         f"({figure_name('frontier', ALL_MODELS)}): rename it")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with theme():
        paths += save_figure(frontier_all_figure(rows), out, figure_name("frontier", ALL_MODELS))
        for model, group in groups.items():
            paths += save_figure(frontier_figure(model, group), out, figure_name("frontier", model))
            paths += save_figure(latent_freq_figure(model, group, freqs), out, figure_name("latent_freq", model))
        if logs:
            for model, group in by_model(logs, lambda lg: lg[0]["model"]).items():
                group = sorted(group, key=lambda lg: (lg[0]["dataset"], str(lg[0]["layer"]), lg[0]["sae"]))
                paths += save_figure(training_figure(model, group), out, figure_name("training", model))
    return paths

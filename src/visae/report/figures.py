"""Per-model figures: the L0-vs-NMSE frontier, latent-frequency histograms and training curves.

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot state) with the Agg backend,
under fixed rcParams, and saved without timestamps, so the same inputs give the same PNG/PDF bytes.
"""

from __future__ import annotations

import math
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
from visae.layout import figure_name, model_slug  # noqa: E402
from visae.report.collect import Row  # noqa: E402

ARCH_ORDER = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]
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
    known = [a for a in ARCH_ORDER if a in archs] + sorted(a for a in archs if a not in ARCH_ORDER)
    colours = sns.color_palette("colorblind", max(10, len(ARCH_ORDER) + len(known)))
    fixed = {a: colours[i] for i, a in enumerate(ARCH_ORDER)}
    extra = iter(colours[len(ARCH_ORDER):])
    return {a: fixed[a] if a in fixed else next(extra) for a in known}


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


def frontier_figure(model: str, rows: list[Row]) -> Figure:
    df = pd.DataFrame({"sae": [r.sae for r in rows], "architecture": [r.architecture for r in rows],
                       "l0": [r.l0 for r in rows], "nmse": [r.nmse for r in rows],
                       GROUP: [f"{r.dataset} · layer {r.layer}" for r in rows]})
    palette = _palette(set(df["architecture"]))
    multi = df[GROUP].nunique() > 1
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for (arch, group), sub in df.groupby(["architecture", GROUP], sort=True):
        sub = sub.sort_values(["l0", "sae"])
        ax.plot(sub["l0"], sub["nmse"], color=palette[arch], alpha=0.5, linewidth=1, zorder=1)
    sns.scatterplot(data=df, x="l0", y="nmse", hue="architecture", hue_order=list(palette), palette=palette,
                    style=GROUP if multi else None, s=60, ax=ax, zorder=2, legend="full")
    for r in df.itertuples():
        ax.annotate(r.sae, (r.l0, r.nmse), xytext=(4, 3), textcoords="offset points", fontsize=7, alpha=0.8)
    _log_axis(ax.xaxis)
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel("L0: active latents per token (log scale)")
    ax.set_ylabel("NMSE on held-out tokens")
    ax.set_title(f"{model}: sparsity vs reconstruction")
    ax.legend(title=None if multi else "architecture", fontsize=8, title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
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


def latent_freq_figure(model: str, rows: list[Row], freqs: dict[tuple, np.ndarray]) -> Figure:
    multi = len({(r.dataset, r.layer) for r in rows}) > 1
    palette = _palette({r.architecture for r in rows})
    n = len(rows)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.9 * ncols + 0.4, 2.3 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    for ax, r in zip(axes, rows):
        edges = _hist_edges(r)
        if r.key in freqs:
            f = freqs[r.key]
            fired = f[f > 0]
            x = np.clip(np.log10(fired), edges[0], edges[-1])
            weights = np.ones_like(x)
            dead = int((f == 0).sum())
        else:
            counts = r.hist["counts"]
            x = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
            weights = np.asarray(counts, dtype=float)
            dead = int(r.hist.get("never_fired", round(r.dead_fraction * r.width)))
        sns.histplot(x=x, weights=weights, bins=edges, ax=ax, color=palette[r.architecture], edgecolor="white",
                     linewidth=0.4)
        ax.axvline(-2.0, color="0.4", linestyle="--", linewidth=0.8)  # the dense threshold, 1% of tokens
        ax.set_title(f"{r.sae} [{r.architecture}]" + (f"\n{r.dataset} · layer {r.layer}" if multi else ""),
                     fontsize=9)
        ax.text(0.03, 0.95, f"dead: {dead}/{r.width}", transform=ax.transAxes, fontsize=7, va="top")
        ax.set_xlabel("log10 firing frequency", fontsize=9)
        ax.set_ylabel("latents", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{model}: latent firing frequency (held-out tokens; dashed: dense threshold 1%)", fontsize=10)
    return fig


def training_figure(model: str, logs: list[tuple[dict, pd.DataFrame]]) -> Figure:
    multi = len({(i["dataset"], i["layer"]) for i, _ in logs}) > 1
    frames = []
    for ident, df in logs:
        label = ident["sae"] + (f" ({ident['dataset']} · layer {ident['layer']})" if multi else "")
        frames.append(pd.DataFrame({"tokens": df["tokens"].to_numpy(), "mse": df["mse"].to_numpy(),
                                    "l0": df["l0"].to_numpy(), "SAE": label}))
    data = pd.concat(frames, ignore_index=True)
    order = sorted(data["SAE"].unique())
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, col, label in ((axes[0], "mse", "training MSE"), (axes[1], "l0", "L0")):
        sns.lineplot(data=data, x="tokens", y=col, hue="SAE", hue_order=order, ax=ax, linewidth=1,
                     legend=ax is axes[1], estimator=None, sort=False)
        _log_axis(ax.yaxis)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(f"{label} (log scale)")
    axes[1].legend(title="SAE", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   frameon=False)
    fig.suptitle(f"{model}: SAE training curves", fontsize=10)
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with matplotlib.rc_context(), sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.2):
        matplotlib.rcParams.update(RC)
        for model, group in by_model(rows, lambda r: r.model).items():
            paths += save_figure(frontier_figure(model, group), out, figure_name("frontier", model))
            paths += save_figure(latent_freq_figure(model, group, freqs), out, figure_name("latent_freq", model))
        if logs:
            for model, group in by_model(logs, lambda lg: lg[0]["model"]).items():
                group = sorted(group, key=lambda lg: (lg[0]["dataset"], str(lg[0]["layer"]), lg[0]["sae"]))
                paths += save_figure(training_figure(model, group), out, figure_name("training", model))
    return paths

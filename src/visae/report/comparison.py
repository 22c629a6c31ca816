"""The comparison's tables and figures, each number next to its baseline.

Tables (csv full precision; md and tex rounded; json keyed for `dvc metrics`):
- `profiles`: per SAE, abstraction (mean purity, abstract fraction) against random latents, the
  concept probe's F1 against matched-frequency latents, invariance per shift against random images;
- `matching`: per pair of SAEs, the fraction of live latents matched at r >= threshold, against the
  permutation null, and for a cross-model pair against each model's seed baseline (matched: r > threshold);
- `similarity`: per pair of models and layer pair, CKA and mutual kNN against their nulls.
Figures: `abstraction_<model>`, `invariance_<model>`, `exemplars_<model>` (per profiled SAE, six
latents spread over the frequency range, each with its top images and their strongest patch
framed; read from the latent index the profile names and the index's store's dataset),
`matching_<a>__<b>` (the matched-correlation histograms of the pair against both seed baselines)
and `exemplars_<a>__<b>` (the most model-specific latents' top images with patch heatmaps).
Identity comes from the files only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from visae.atomic import atomic_path
from visae.errors import VisaeError
from visae.layout import EXEMPLARS, MATCHES, Identity, figure_name
from visae.report.collect import read_json
from visae.report.figures import natural_key, save_figure, theme  # also selects the Agg backend

from matplotlib.figure import Figure  # noqa: E402
import seaborn as sns  # noqa: E402

PAIR = "{a}__{b}"


def _read(path, what: str) -> dict:
    return read_json(Path(path), what)


def _ci(block) -> tuple[float, float, float]:
    """(value, low, high) of a bootstrap block ({value, low, high}); NaNs when absent."""
    if not block:
        return (math.nan,) * 3
    return tuple(math.nan if block.get(k) is None else float(block[k]) for k in ("value", "low", "high"))


# -- tables ------------------------------------------------------------------------------------

def profile_rows(paths) -> pd.DataFrame:
    records = []
    for path in paths:
        p = _read(path, "profile.json")
        ident = Identity.from_file(p, path)
        a, chance = p["abstraction"]["model"], p["abstraction"]["chance"]
        c = p["concepts"]["summary"]
        row = {**ident.to_dict(), "alive_fraction": p["alive_fraction"]}
        for key, block in (("purity", a["mean_purity"]), ("abstract", a["abstract_fraction"])):
            row[key], row[f"{key}_low"], row[f"{key}_high"] = _ci(block)
        row["purity_chance"] = _ci(chance["mean_purity"])[0]
        row["abstract_chance"] = _ci(chance["abstract_fraction"])[0]
        row["specific"] = a["fractions"]["specific"]
        row["specific_chance"] = chance["fractions"]["specific"]
        row["mixed"] = a["fractions"]["mixed"]
        for key in ("f1_single", "baseline_f1_single", "f1_top", "baseline_f1_top"):
            row[key] = c.get(f"mean_{key}")
        inv = p.get("invariance") or {}
        for shift in inv.get("headline_shifts", []):
            row[f"inv_{shift}"] = _ci(inv["shifts"][shift]["headline"])[0]
        if inv:
            row["inv_baseline"] = _ci(inv["baseline"]["headline"])[0]
        if p.get("domain"):
            row[f"domain_{p['domain']['dataset']}"] = _ci(p["domain"]["headline"])[0]
            row["domain_baseline"] = _ci(p["domain"]["baseline"])[0]
        records.append(row)
    df = pd.DataFrame.from_records(records)
    return df.sort_values(["model", "dataset", "sae"], kind="stable").reset_index(drop=True) if len(df) else df


def matching_rows(paths) -> pd.DataFrame:
    records = []
    for path in paths:
        m = _read(path, "matching.json")
        for name in (MATCHES, EXEMPLARS):  # the figures read them: refuse a tampered or half-copied one now
            _checked(path, name)
        a, b = Identity.from_file({"identity": m.get("identity_a")}, path), \
            Identity.from_file({"identity": m.get("identity_b")}, path)
        records.append({"kind": m["kind"], "model_a": a.model, "layer_a": a.layer, "sae_a": a.sae,
                        "model_b": b.model, "layer_b": b.layer, "sae_b": b.sae, "dataset": a.dataset,
                        "images": m["images"], "threshold": m["threshold"],
                        "matched": m["matched_fraction"], "null": m["null_matched_fraction"],
                        "mean_matched_r": m.get("mean_matched_correlation"),
                        "unique_a": m.get("unique_fraction_a"), "unique_b": m.get("unique_fraction_b")})
    df = pd.DataFrame.from_records(records)
    if not len(df):
        return df
    seed = df[df.kind == "seed baseline"].set_index(["model_a", "layer_a", "sae_a"])["matched"]
    cross = df.kind == "cross-model"
    df["seed_a"] = [seed.get(key, math.nan) for key in zip(df.model_a, df.layer_a, df.sae_a)]
    df["seed_b"] = [seed.get(key, math.nan) for key in zip(df.model_b, df.layer_b, df.sae_b)]
    df.loc[~cross, ["seed_a", "seed_b"]] = math.nan
    return df.sort_values(["kind", "model_a", "model_b", "sae_a"], kind="stable").reset_index(drop=True)


def similarity_rows(paths) -> pd.DataFrame:
    records = []
    for path in paths:
        s = _read(path, "similarity.json")
        for r in s["rows"]:
            records.append({"model_a": s["model_a"], "model_b": s["model_b"], "dataset": s["dataset"],
                            "images": s["images"], **r})
    return pd.DataFrame.from_records(records)


def rounded(df: pd.DataFrame) -> pd.DataFrame:
    """The Markdown / LaTeX view: numbers to 3 decimals, without the store hash (the CSV keeps it)."""
    out = df.drop(columns=[c for c in ("store_hash",) if c in df.columns])
    for col in out.columns:
        if out[col].dtype.kind == "f":
            out[col] = [("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
                        for v in out[col]]
    return out


def write_table(df: pd.DataFrame, out: Path, name: str, key_columns: list[str]) -> list[Path]:
    """`<name>.csv` (full precision), `.md`, `.tex` (rounded) and `.json` (numbers keyed by row)."""
    out.mkdir(parents=True, exist_ok=True)
    shown = rounded(df)
    keyed = {"/".join(str(r[k]) for k in key_columns): {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                        for k, v in r.items() if k not in key_columns}
             for r in df.to_dict("records")}
    texts = {
        "csv": df.to_csv(index=False, na_rep="", lineterminator="\n"),
        "md": (shown.to_markdown(index=False, disable_numparse=True) if len(df) else "(no rows)") + "\n",
        "tex": shown.style.hide(axis="index").format(escape="latex").to_latex(hrules=True) if len(df) else "\n",
        "json": json.dumps(keyed, indent=2, sort_keys=True, default=str) + "\n",
    }
    paths = []
    for ext, text in texts.items():
        with atomic_path(out / f"{name}.{ext}") as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths.append(out / f"{name}.{ext}")
    return paths


# -- figures -----------------------------------------------------------------------------------

SAE_COLOUR, BASE_COLOUR = sns.color_palette("colorblind")[0], "0.65"  # the measured number, its baseline
MARK = "#ff2d55"  # the argmax patch's frame over an exemplar


def _figure(n_panels: int, width: float = 4.4, height: float = 3.4) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * max(1, n_panels), height), layout="constrained")
    axes = fig.subplots(1, max(1, n_panels), squeeze=False, sharey=True)[0]
    return fig, list(axes)


def _interval(block) -> str:
    v, lo, hi = _ci(block)
    return "-" if math.isnan(v) else (f"{v:.2f}" if math.isnan(lo) else f"{v:.2f} [{lo:.2f}, {hi:.2f}]")


def abstraction_figure(model: str, profiles: list[dict]) -> Figure:
    """Per SAE: the share of its latents whose top images are specific / abstract / mixed, beside
    random "latents" (top images drawn by chance from the same images)."""
    fig, axes = _figure(len(profiles))
    cats = ["specific", "abstract", "mixed"]
    for ax, p in zip(axes, profiles):
        a = p["abstraction"]
        x = np.arange(len(cats))
        model_v = [a["model"]["fractions"][c] for c in cats]
        chance_v = [a["chance"]["fractions"][c] for c in cats]
        ax.bar(x - 0.2, model_v, 0.4, label="SAE latents", color=SAE_COLOUR)
        ax.bar(x + 0.2, chance_v, 0.4, label="random latents (baseline)", color=BASE_COLOUR)
        for xi, v in zip(x, model_v):
            ax.text(xi - 0.2, v + 0.015, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, cats)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("class pattern of the latent's top images")
        ax.set_title(f"{p['identity']['sae']}\nmean purity {_interval(a['model']['mean_purity'])} "
                     f"vs random {_ci(a['chance']['mean_purity'])[0]:.2f}", fontsize=8.5)
    axes[0].set_ylabel("fraction of the SAE's latents")
    axes[0].legend(fontsize=7.5, loc="upper left", frameon=True)
    fig.suptitle(f"{model}: how abstract are the latents? SAE latents against random latents\n"
                 f"(top images of one class: specific; of one coarse group: abstract; across groups: mixed)",
                 fontsize=9.5)
    return fig


def invariance_figure(model: str, profiles: list[dict]) -> Figure:
    """Per SAE: the mean fraction of top images a latent still fires on under each shift (95% CI),
    against the baseline of random other images."""
    fig, axes = _figure(len(profiles))
    for ax, p in zip(axes, profiles):
        inv = p.get("invariance")
        if not inv:
            ax.text(0.5, 0.5, "invariance not run", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(p["identity"]["sae"], fontsize=8.5)
            continue
        shifts = inv["headline_shifts"]
        vals = [_ci(inv["shifts"][s]["headline"]) for s in shifts]
        x = np.arange(len(shifts))
        ax.bar(x, [v[0] for v in vals], 0.6, color=SAE_COLOUR, label="top images, shifted",
               yerr=np.array([[v[0] - v[1], v[2] - v[0]] for v in vals]).T if vals else None, capsize=3,
               error_kw={"elinewidth": 1, "ecolor": "0.2"})
        base, lo, hi = _ci(inv["baseline"]["headline"])
        ax.axhspan(lo, hi, color=BASE_COLOUR, alpha=0.35, lw=0)
        ax.axhline(base, color="0.3", ls="--", lw=1, label=f"random images, unshifted (baseline {base:.2f})")
        ax.set_xticks(x, shifts, rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("domain shift applied to the top images")
        ax.set_title(f"{p['identity']['sae']} ({inv['latents']} latents, 95% CI)", fontsize=8.5)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("still fires\n(fraction of its top images)")
    fig.suptitle(f"{model}: does a latent still fire on its top images after a domain shift?\n"
                 f"(dashed: how often it fires on random unshifted images, the baseline)", fontsize=9.5)
    return fig


def _checked(match_path: Path, name: str) -> Path:
    """A matching's data file, refused with one line unless it has the sha256 matching.json records."""
    from visae.store.format import sha256_file

    path = Path(match_path).parent / name
    recorded = _read(match_path, "matching.json").get("files_sha256", {}).get(name)
    if not path.is_file() or sha256_file(path) != recorded:
        raise VisaeError(f"{path} is missing or does not match the sha256 in {match_path}: rerun `visae compare`")
    return path


def _matches(match_path: Path) -> pd.DataFrame:
    return pd.read_csv(_checked(match_path, MATCHES))


def _matched_r(match_path: Path, side: str = "a") -> np.ndarray:
    df = _matches(match_path)
    df = df[(df.side == side) & (df.alive.astype(bool))]
    return df.matched_correlation.fillna(0).to_numpy()


def matching_figure(pair: str, sae_panels: list[tuple[str, dict, dict]]) -> Figure:
    """Per SAE: histograms of each live latent's matched correlation, model A to B, against A's
    and B's seed baselines (the same SAE trained from another seed)."""
    fig, axes = _figure(len(sae_panels))
    bins = np.linspace(0, 1, 21)
    colours = sns.color_palette("colorblind", 3)
    for ax, (sae, cross, seeds) in zip(axes, sae_panels):
        ax.hist(_matched_r(cross["path"]), bins=bins, histtype="step", lw=2.2, color=colours[0],
                label=f"{cross['a']} → {cross['b']}: {cross['matched']:.2f}")
        for colour, (model, seed) in zip(colours[1:], seeds.items()):
            ax.hist(_matched_r(seed["path"]), bins=bins, histtype="step", lw=1.4, ls="--", color=colour,
                    label=f"{model} → its 2nd seed: {seed['matched']:.2f}")
        ax.axvline(cross["threshold"], color="0.35", lw=1, ls=":")
        ax.text(cross["threshold"], 0.02, f" threshold r = {cross['threshold']:g}",
                transform=ax.get_xaxis_transform(), fontsize=7, va="bottom", color="0.35")
        ax.set_xlim(0, 1)
        ax.set_xlabel("correlation with its one-to-one partner\n(Pearson r over image-level activations)")
        ax.set_title(sae, fontsize=8.5)
        ax.legend(fontsize=7, title="fraction matched (r > threshold)", title_fontsize=7, loc="upper right")
    axes[0].set_ylabel("alive latents")
    fig.suptitle(f"{pair.replace('__', ' vs ')}: do the two models' SAEs learn the same latents?\n"
                 f"matching across the models (solid) against each model's seed baseline (dashed)", fontsize=9.5)
    return fig


def heat_overlay(ax, image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> None:
    """The image with the latent's per-patch activation over it (scaled to its maximum); patches
    where it is silent stay untinted, so the image reads as it is."""
    ax.imshow(image)
    if heat.max() > 0:
        shown = np.ma.masked_less_equal(heat / heat.max(), 0)
        ax.imshow(shown, cmap="magma", vmin=0, vmax=1, alpha=alpha, extent=(0, image.shape[1], image.shape[0], 0),
                  interpolation="nearest")


def _patch_box(ax, patch: int, grid, size, offset: int = 0) -> None:
    """Frame patch `patch` of a `grid` (rows, cols) laid over an image of `size` (height, width)
    pixels drawn `offset` pixels from the left."""
    from matplotlib.patches import Rectangle

    gh, gw = int(grid[0]), int(grid[1])
    r, c = divmod(int(patch), gw)
    ph, pw = size[0] / gh, size[1] / gw
    ax.add_patch(Rectangle((offset + c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, ec=MARK, lw=1.4))


def exemplars_figure(pair: str, match_path: Path, summary: dict, latents: int = 4, images: int = 6) -> Figure:
    """The latents most unique to each model (lowest best correlation with the other's), each with
    its top images and the latent's patch heatmap over them, its best correlation with any latent
    of the other model beside it."""
    arrays = load_file(str(_checked(match_path, EXEMPLARS)))
    best = _matches(match_path).set_index(["side", "latent"])["best_correlation"]
    rows = [(side, i) for side in ("a", "b") for i in range(min(latents, len(arrays[f"{side}_latents"])))]
    fig = Figure(figsize=(1.3 * images, 1.45 * max(1, len(rows)) + 0.5), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), images, squeeze=False)
    for r, (side, i) in enumerate(rows):
        model = summary[f"identity_{side}"]["model"]
        other = summary[f"identity_{'b' if side == 'a' else 'a'}"]["model"]
        latent = int(arrays[f"{side}_latents"][i])
        for c in range(images):
            ax = axes[r][c]
            if c >= arrays[f"{side}_images"].shape[1] or arrays[f"{side}_images"][i, c] < 0:
                continue
            thumb = arrays[f"{side}_thumbnails"][i, c]
            heat = arrays[f"{side}_heatmaps"][i, c]
            heat_overlay(ax, thumb, heat)
            if heat.max() > 0:
                _patch_box(ax, int(np.argmax(heat)), heat.shape, thumb.shape)
            if c == 0:
                r_best = best.get((side, latent), math.nan)
                ax.set_title(f"{model} latent {latent}: best r with {other} {r_best:.2f}", fontsize=7, loc="left")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(f"{pair.replace('__', ' vs ')} ({summary['identity_a']['sae']}): the latents most unique to each "
                 f"model\n"
                 f"(top images, the latent's activation per patch overlaid, its strongest patch framed)", fontsize=9)
    return fig


def _index_of(profile: dict, path):
    """The latent index a profile was computed from (`index` in profile.json), checked to be the same SAE."""
    from visae.analysis.latent_index import LatentIndex

    where = profile.get("index")
    if not where:
        raise VisaeError(f"profile.json {path} names no latent index ('index'): rerun `visae profile`")
    index = LatentIndex.load(where)
    if index.identity.to_dict() != profile["identity"]:
        raise VisaeError(f"profile.json {path} is of {Identity.from_file(profile, path).key}, but its index {where} "
                         f"is of {index.identity.key}: rerun `visae profile`")
    return index


def exemplar_latents(index, n: int, images: int) -> np.ndarray:
    """`n` latents spread evenly over the frequency ranks of the alive latents with at least
    `images` top images, most frequent first: the index's range, neither cherry-picked nor only dense."""
    full = (index.top_images[:, :images] >= 0).sum(1) >= images
    eligible = np.flatnonzero(index.alive & full)
    if not len(eligible):
        return eligible
    ranked = eligible[np.lexsort((eligible, -index.frequency[eligible]))]
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(n, len(ranked)))).astype(int))
    return ranked[picks]


def _thumbnails(index, images: np.ndarray) -> np.ndarray:
    """Thumbnails of store images from the index's store and its dataset (blank for a store without one)."""
    from visae.analysis.compare import thumbnails
    from visae.store import ActivationStore

    store = ActivationStore(index.meta["store"])
    if store.store_hash != index.identity.store_hash:
        raise VisaeError(f"store {index.meta['store']} changed since the latent index {index.identity.key} was "
                         f"built: rerun `visae latents`")
    return thumbnails(store, images)


def model_exemplars_figure(model: str, indexes: list, latents: int = 6, images: int = 6, gap: int = 6) -> Figure:
    """Per SAE of one model (one block each): a few latents across the frequency range, each row
    its top images side by side (one image per row: cheap to lay out) with each image's strongest
    patch framed."""
    fig = Figure(figsize=(1.25 * images * len(indexes) + 0.4, 1.3 * latents + 0.9), layout="constrained")
    subs = fig.subfigures(1, len(indexes), squeeze=False)[0]
    for sub, index in zip(subs, indexes):
        chosen = exemplar_latents(index, latents, images)
        axes = sub.subplots(max(1, latents), 1, squeeze=False)[:, 0]
        for ax in axes:
            ax.set_axis_off()
        sub.suptitle(f"{index.identity.sae}: {len(chosen)} latents across the frequency range", fontsize=9)
        if not len(chosen):
            axes[0].text(0, 0.5, "no alive latent with enough top images", fontsize=8)
            continue
        thumbs = _thumbnails(index, index.top_images[chosen, :images])  # [latents, images, S, S, 3]
        size = thumbs.shape[2:4]
        patches = index.meta.get("pooled_tokens") == "patches" and index.meta.get("grid")
        labels = index.top_labels[chosen, :images]
        for r, (ax, latent) in enumerate(zip(axes, chosen)):
            strip = np.full((size[0], images * (size[1] + gap) - gap, 3), 255, dtype=np.uint8)
            for c in range(images):
                strip[:, c * (size[1] + gap):c * (size[1] + gap) + size[1]] = thumbs[r, c]
            ax.imshow(strip, interpolation="nearest")
            if patches:
                for c in range(images):
                    _patch_box(ax, int(index.top_patch[latent, c]), index.meta["grid"], size,
                               offset=c * (size[1] + gap))
            counts = np.bincount(labels[r][labels[r] >= 0], minlength=len(index.classes))
            top = int(np.argmax(counts))
            ax.set_title(f"latent {int(latent)}: fires on {index.frequency[latent]:.0%} of images; "
                         f"{counts[top]}/{images} of its top images {index.classes[top]}", fontsize=7, loc="left")
    fig.suptitle(f"{model}: what the latents respond to: each row one latent's top held-out images, "
                 f"its strongest patch framed", fontsize=10)
    return fig


def write_comparison(profiles, matchings, similarities, tables_out, figures_out) -> list[Path]:
    """Every comparison table and figure; returns the files written."""
    tables_out, figures_out = Path(tables_out), Path(figures_out)
    written = write_table(profile_rows(profiles), tables_out, "profiles", ["model", "dataset", "layer", "sae"])
    mdf = matching_rows(matchings)
    written += write_table(mdf, tables_out, "matching", ["kind", "model_a", "layer_a", "sae_a", "model_b", "layer_b",
                                                          "sae_b"])
    written += write_table(similarity_rows(similarities), tables_out, "similarity",
                           ["model_a", "model_b", "pool", "layer_a", "layer_b"])
    figures_out.mkdir(parents=True, exist_ok=True)
    loaded = [(_read(p, "profile.json"), p) for p in profiles]
    indexes = {id(p): _index_of(p, path) for p, path in loaded}  # all checked before any figure is drawn
    with theme():
        by_model: dict[str, list] = {}
        for p, _ in loaded:
            by_model.setdefault(p["identity"]["model"], []).append(p)
        for model, items in sorted(by_model.items()):
            items = sorted(items, key=lambda p: natural_key(p["identity"]["sae"]))
            written += save_figure(abstraction_figure(model, items), figures_out, figure_name("abstraction", model))
            written += save_figure(invariance_figure(model, items), figures_out, figure_name("invariance", model))
            written += save_figure(model_exemplars_figure(model, [indexes[id(p)] for p in items]), figures_out,
                                   figure_name("exemplars", model))
        matches = [(_read(p, "matching.json"), Path(p)) for p in matchings]
        seeds = {(m["identity_a"]["model"], m["identity_a"]["layer"], m["identity_a"]["sae"]): m | {"path": p}
                 for m, p in matches if m["kind"] == "seed baseline"}
        pairs: dict[str, list] = {}
        for m, p in matches:
            if m["kind"] != "cross-model":
                continue
            ia, ib = m["identity_a"], m["identity_b"]
            pair = PAIR.format(a=ia["model"], b=ib["model"])
            cross = {"path": p, "a": ia["model"], "b": ib["model"], "matched": m["matched_fraction"],
                     "threshold": m["threshold"], "summary": m}
            twin = {side["model"]: seeds[(side["model"], side["layer"], side["sae"])] |
                    {"matched": seeds[(side["model"], side["layer"], side["sae"])]["matched_fraction"]}
                    for side in (ia, ib) if (side["model"], side["layer"], side["sae"]) in seeds}
            pairs.setdefault(pair, []).append((f"{ia['sae']}, layers {ia['layer']} / {ib['layer']}", cross, twin))
        for pair, panels in pairs.items():
            panels = sorted(panels, key=lambda t: t[0])
            written += save_figure(matching_figure(pair, panels), figures_out, figure_name("matching", pair))
            first = panels[0][1]
            written += save_figure(exemplars_figure(pair, first["path"], first["summary"]), figures_out,
                             figure_name("exemplars", pair))
    return written

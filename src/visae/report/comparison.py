"""The comparison's tables and figures, each number next to its baseline.

Tables (csv full precision; md and tex rounded; json keyed for `dvc metrics`):
- `profiles`: per SAE, abstraction (mean purity, abstract fraction) against random latents, the
  concept probe's F1 against matched-frequency latents, invariance per shift against random images;
- `matching`: per pair of SAEs, the fraction of live latents matched at r >= threshold, against the
  permutation null, and for a cross-model pair against each model's seed baseline (matched: r > threshold);
- `similarity`: per pair of models and layer pair, CKA and mutual kNN against their nulls.
Figures: `abstraction_<model>`, `invariance_<model>`, `matching_<a>__<b>` (the matched-correlation
histograms of the pair against both seed baselines) and `exemplars_<a>__<b>` (the most
model-specific latents' top images with patch heatmaps). Identity comes from the files only.
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
from visae.report.figures import RC, save_figure  # also selects the Agg backend

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

def _figure(n_panels: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * max(1, n_panels), height), layout="constrained")
    axes = fig.subplots(1, max(1, n_panels), squeeze=False)[0]
    return fig, list(axes)


def abstraction_figure(model: str, profiles: list[dict]) -> Figure:
    """Per SAE: the share of specific / abstract / mixed latents, beside random latents."""
    fig, axes = _figure(len(profiles))
    cats = ["specific", "abstract", "mixed"]
    for ax, p in zip(axes, profiles):
        a = p["abstraction"]
        x = np.arange(len(cats))
        ax.bar(x - 0.2, [a["model"]["fractions"][c] for c in cats], 0.4, label="SAE latents")
        ax.bar(x + 0.2, [a["chance"]["fractions"][c] for c in cats], 0.4, label="random latents", color="0.7")
        ax.set_xticks(x, cats)
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of latents")
        ax.set_title(f"{p['identity']['sae']} (purity {a['model']['mean_purity']['value']:.2f} "
                     f"vs {a['chance']['mean_purity']['value']:.2f})", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: abstraction of the top images' classes", fontsize=10)
    return fig


def invariance_figure(model: str, profiles: list[dict]) -> Figure:
    """Per SAE: the mean fraction of top images a latent still fires on under each shift (95% CI),
    against the baseline of random other images."""
    fig, axes = _figure(len(profiles))
    for ax, p in zip(axes, profiles):
        inv = p.get("invariance")
        if not inv:
            ax.text(0.5, 0.5, "invariance not run", ha="center", va="center", transform=ax.transAxes)
            continue
        shifts = inv["headline_shifts"]
        vals = [_ci(inv["shifts"][s]["headline"]) for s in shifts]
        x = np.arange(len(shifts))
        ax.bar(x, [v[0] for v in vals], 0.6, yerr=np.array([[v[0] - v[1], v[2] - v[0]] for v in vals]).T
               if vals else None, capsize=3)
        base = _ci(inv["baseline"]["headline"])[0]
        ax.axhline(base, color="0.3", ls="--", lw=1, label=f"random images ({base:.2f})")
        ax.set_xticks(x, shifts, rotation=30)
        ax.set_ylim(0, 1)
        ax.set_ylabel("still fires (fraction of top images)")
        ax.set_title(f"{p['identity']['sae']} ({inv['latents']} latents)", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model}: invariance under domain shifts", fontsize=10)
    return fig


def _checked(match_path: Path, name: str) -> Path:
    """A matching's data file, refused with one line unless it has the sha256 matching.json records."""
    from visae.store.format import sha256_file

    path = Path(match_path).parent / name
    recorded = _read(match_path, "matching.json").get("files_sha256", {}).get(name)
    if not path.is_file() or sha256_file(path) != recorded:
        raise VisaeError(f"{path} is missing or does not match the sha256 in {match_path}: rerun `visae compare`")
    return path


def _matched_r(match_path: Path, side: str = "a") -> np.ndarray:
    df = pd.read_csv(_checked(match_path, MATCHES))
    df = df[(df.side == side) & (df.alive.astype(bool))]
    return df.matched_correlation.fillna(0).to_numpy()


def matching_figure(pair: str, sae_panels: list[tuple[str, dict, dict]]) -> Figure:
    """Per SAE: histograms of each live latent's matched correlation, model A to B, against A's
    and B's seed baselines (the same SAE trained from another seed)."""
    fig, axes = _figure(len(sae_panels))
    bins = np.linspace(0, 1, 21)
    colours = sns.color_palette("colorblind", 3)
    for ax, (sae, cross, seeds) in zip(axes, sae_panels):
        ax.hist(_matched_r(cross["path"]), bins=bins, histtype="step", lw=2, color=colours[0],
                label=f"{cross['a']} → {cross['b']} ({cross['matched']:.2f})")
        for colour, (model, seed) in zip(colours[1:], seeds.items()):
            ax.hist(_matched_r(seed["path"]), bins=bins, histtype="step", lw=1.5, ls="--", color=colour,
                    label=f"{model}, 2nd seed ({seed['matched']:.2f})")
        ax.axvline(cross["threshold"], color="0.5", lw=0.8)
        ax.set_xlabel("matched correlation")
        ax.set_ylabel("latents")
        ax.set_title(sae, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{pair}: one-to-one latent matching (fraction matched at r > threshold)", fontsize=10)
    return fig


def exemplars_figure(pair: str, match_path: Path, summary: dict, latents: int = 4, images: int = 6) -> Figure:
    """The latents most unique to each model (lowest best correlation with the other's), each with
    its top images and the latent's patch heatmap over them."""
    arrays = load_file(str(_checked(match_path, EXEMPLARS)))
    rows = [(side, i) for side in ("a", "b") for i in range(min(latents, len(arrays[f"{side}_latents"])))]
    fig = Figure(figsize=(1.3 * images, 1.4 * max(1, len(rows)) + 0.4), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), images, squeeze=False)
    for r, (side, i) in enumerate(rows):
        model = summary[f"identity_{side}"]["model"]
        latent = int(arrays[f"{side}_latents"][i])
        for c in range(images):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= arrays[f"{side}_images"].shape[1] or arrays[f"{side}_images"][i, c] < 0:
                continue
            thumb = arrays[f"{side}_thumbnails"][i, c]
            heat = arrays[f"{side}_heatmaps"][i, c]
            ax.imshow(thumb)
            if heat.max() > 0:
                ax.imshow(heat / heat.max(), cmap="magma", alpha=0.45, extent=(0, thumb.shape[1], thumb.shape[0], 0),
                          interpolation="nearest")
            if c == 0:
                ax.set_title(f"{model} #{latent}", fontsize=7, loc="left")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(f"{pair} ({summary['identity_a']['sae']}): latents unique to each model", fontsize=9)
    return fig


def write_comparison(profiles, matchings, similarities, tables_out, figures_out) -> list[Path]:
    """Every comparison table and figure; returns the files written."""
    import matplotlib

    tables_out, figures_out = Path(tables_out), Path(figures_out)
    written = write_table(profile_rows(profiles), tables_out, "profiles", ["model", "dataset", "layer", "sae"])
    mdf = matching_rows(matchings)
    written += write_table(mdf, tables_out, "matching", ["kind", "model_a", "layer_a", "sae_a", "model_b", "layer_b",
                                                          "sae_b"])
    written += write_table(similarity_rows(similarities), tables_out, "similarity",
                           ["model_a", "model_b", "pool", "layer_a", "layer_b"])
    figures_out.mkdir(parents=True, exist_ok=True)
    loaded = [(_read(p, "profile.json"), p) for p in profiles]
    with matplotlib.rc_context(RC):
        by_model: dict[str, list] = {}
        for p, _ in loaded:
            by_model.setdefault(p["identity"]["model"], []).append(p)
        for model, items in by_model.items():
            items = sorted(items, key=lambda p: p["identity"]["sae"])
            written += save_figure(abstraction_figure(model, items), figures_out, figure_name("abstraction", model))
            written += save_figure(invariance_figure(model, items), figures_out, figure_name("invariance", model))
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

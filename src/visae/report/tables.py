"""The SAE table: `saes.csv` (full precision), `saes.md` and `saes.tex` (rounded, booktabs)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from visae.atomic import atomic_path
from visae.layout import layer_dir
from visae.report.collect import Row

# (CSV column, Markdown header, LaTeX header, formatter for the rounded tables)
COLUMNS = [
    ("model", "model", "model", str),
    ("dataset", "dataset", "dataset", str),
    ("layer", "layer", "layer", str),
    ("sae", "SAE", "SAE", str),
    ("architecture", "architecture", "architecture", str),
    ("width", "width", "width", lambda v: f"{int(v)}"),
    ("k", "k", "$k$", lambda v: f"{int(v)}"),
    ("lambda", "λ", r"$\lambda$", lambda v: f"{v:.3g}"),
    ("l0", "L0", "L0", lambda v: f"{v:.2f}"),
    ("mse", "MSE", "MSE", lambda v: f"{v:.4g}"),
    ("nmse", "NMSE", "NMSE", lambda v: f"{v:.4g}"),
    ("explained_variance", "expl. var.", "expl.\\ var.", lambda v: f"{v:.3f}"),
    ("dead_fraction", "dead", "dead", lambda v: f"{v:.3f}"),
    ("dense_fraction", "dense", "dense", lambda v: f"{v:.3f}"),
]
NUMERIC_FROM = 5  # columns from here on are right-aligned numbers
MISSING = "-"
FILES = tuple(f"saes.{ext}" for ext in ("csv", "md", "tex", "json"))  # the formats of TABLE_FORMATS


def rows_frame(rows: list[Row]) -> pd.DataFrame:
    """One row per SAE, in the rows' (sorted) order, with the CSV's columns and full-precision values."""
    records = [{"model": r.model, "dataset": r.dataset, "layer": r.layer, "sae": r.sae,
                "architecture": r.architecture, "width": r.width, "k": r.k, "lambda": r.lam, "l0": r.l0,
                "mse": r.mse, "nmse": r.nmse, "explained_variance": r.explained_variance,
                "dead_fraction": r.dead_fraction, "dense_fraction": r.dense_fraction} for r in rows]
    df = pd.DataFrame.from_records(records, columns=[c[0] for c in COLUMNS])
    df["k"] = df["k"].astype("Int64")
    df["lambda"] = df["lambda"].astype("float64")
    df["width"] = df["width"].astype("int64")
    if all(isinstance(v, int) for v in df["layer"]):
        df["layer"] = df["layer"].astype("int64")
    return df


def _display(df: pd.DataFrame, header: int) -> pd.DataFrame:
    """Rounded strings; `header` picks the Markdown (1) or LaTeX (2) column names."""
    out = {}
    for col in COLUMNS:
        fmt = col[3]
        out[col[header]] = [MISSING if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))
                            else fmt(v) for v in df[col[0]].tolist()]
    return pd.DataFrame(out, columns=[c[header] for c in COLUMNS])


def markdown(df: pd.DataFrame) -> str:
    disp = _display(df, 1)
    align = ["left"] * NUMERIC_FROM + ["right"] * (len(COLUMNS) - NUMERIC_FROM)
    return disp.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


def latex(df: pd.DataFrame) -> str:
    disp = _display(df, 2)
    styler = disp.style.hide(axis="index").format(escape="latex")
    fmt = "l" * NUMERIC_FROM + "r" * (len(COLUMNS) - NUMERIC_FROM)
    return styler.to_latex(hrules=True, column_format=fmt)


def metrics_json(df) -> str:
    """The numbers keyed by model/dataset/layer/sae: the nested JSON that `dvc metrics` reads."""
    import json
    import math

    numbers = ("l0", "mse", "nmse", "explained_variance", "dead_fraction", "dense_fraction")
    out = {}
    for row in df.to_dict("records"):
        key = f"{row['model']}/{row['dataset']}/{layer_dir(row['layer'])}/{row['sae']}"
        out[key] = {k: float(row[k]) for k in numbers if row.get(k) is not None and not math.isnan(float(row[k]))}
    return json.dumps(out, indent=2, sort_keys=True) + "\n"


def write_tables(rows: list[Row], out: str | Path) -> dict[str, Path]:
    """Write saes.csv, saes.md and saes.tex under `out`, each atomically; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = rows_frame(rows)
    texts = {"saes.csv": df.to_csv(index=False, na_rep="", lineterminator="\n"),
             "saes.md": markdown(df), "saes.tex": latex(df), "saes.json": metrics_json(df)}
    paths = {}
    for name in FILES:
        with atomic_path(out / name) as tmp:
            tmp.write_text(texts[name], encoding="utf-8")
        paths[name] = out / name
    return paths

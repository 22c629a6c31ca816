"""Reading the report's inputs: metrics.json, latents.csv and log.csv, with one-line errors.

Every input names itself: metrics.json has an `identity` block and the SAE's grid `entry` (k, λ),
latents.csv has identity columns, and a training log.csv is described by the SAE checkpoint's
config.json beside it (its `identity` block). Nothing is read from a file's path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from visae.errors import VisaeError
from visae.layout import Identity, layer_dir
from visae.sae.config import SPARSITY_KEY  # the λ key of penalised architectures

__all__ = ["Row", "collect_rows", "load_latents", "load_log", "match_latents", "read_json"]

# Keys a metrics.json must have, with the table column each feeds.
REQUIRED_METRICS = ("architecture", "width", "l0", "mse", "nmse", "explained_variance", "dead_fraction",
                    "dense_fraction")
NUMERIC_METRICS = REQUIRED_METRICS[1:]
IDENTITY_COLUMNS = tuple(Identity.__dataclass_fields__)


@dataclass
class Row:
    """One evaluated SAE: its identity, hyperparameters and metrics."""

    model: str
    dataset: str
    layer: int | str
    sae: str
    store_hash: str
    architecture: str
    width: int
    k: int | None
    lam: float | None
    l0: float
    mse: float
    nmse: float
    explained_variance: float
    dead_fraction: float
    dense_fraction: float
    path: Path
    hist: dict | None = None

    @property
    def key(self) -> tuple:
        return (self.model, self.dataset, _layer_key(self.layer), self.sae)

    @property
    def label(self) -> str:
        return f"{self.sae} ({self.dataset}, layer {self.layer})"


def _layer_key(layer) -> tuple:
    return (0, layer, "") if isinstance(layer, int) else (1, 0, str(layer))


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise VisaeError(f"{what} {path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise VisaeError(f"{what} {path} is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise VisaeError(f"{what} {path} is not a JSON object")
    return obj


def _number(path: Path, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VisaeError(f"metrics file {path}: key {key!r} is {value!r}, not a number")
    return value


def load_metrics(path: str | Path) -> Row:
    path = Path(path)
    m = read_json(path, "metrics file")
    ident = Identity.from_file(m, f"metrics file {path}")
    for key in REQUIRED_METRICS:
        if key not in m:
            raise VisaeError(f"metrics file {path} lacks required key {key!r}")
    for key in NUMERIC_METRICS:
        _number(path, key, m[key])
    arch = str(m["architecture"])
    entry = m.get("entry") if isinstance(m.get("entry"), dict) else {}
    k = entry.get("k")
    lam = entry.get(SPARSITY_KEY.get(arch, "lambda"))
    hist = m.get("log10_freq_hist")
    return Row(model=ident.model, dataset=ident.dataset, layer=ident.layer, sae=ident.sae,
               store_hash=ident.store_hash, architecture=arch, width=int(m["width"]),
               k=None if k is None else int(_number(path, "k", k)),
               lam=None if lam is None else float(_number(path, "lambda", lam)),
               l0=float(m["l0"]), mse=float(m["mse"]), nmse=float(m["nmse"]),
               explained_variance=float(m["explained_variance"]), dead_fraction=float(m["dead_fraction"]),
               dense_fraction=float(m["dense_fraction"]), path=path,
               hist=hist if isinstance(hist, dict) else None)


def collect_rows(paths) -> list[Row]:
    """Rows for the given metrics files, sorted by (model, dataset, layer, sae); duplicates are an error."""
    if not paths:
        raise VisaeError("no metrics files given (--metrics)")
    rows = sorted((load_metrics(p) for p in paths), key=lambda r: r.key)
    for a, b in zip(rows, rows[1:]):
        if a.key == b.key:
            raise VisaeError(f"{a.path} and {b.path} are both model {a.model!r}, dataset {a.dataset!r}, "
                             f"layer {a.layer}, SAE {a.sae!r}")
    return rows


def read_csv(path: Path, what: str, columns: tuple[str, ...], text: tuple[str, ...] = ()) -> pd.DataFrame:
    """The CSV at `path`, checking that `columns` are numeric; `text` columns are read as strings."""
    if not path.is_file():
        raise VisaeError(f"{what} {path} does not exist")
    try:
        df = pd.read_csv(path, dtype={c: str for c in text})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise VisaeError(f"{what} {path} is not a readable CSV ({str(err).splitlines()[0]})") from None
    for col in columns:
        if col not in df.columns:
            raise VisaeError(f"{what} {path} lacks column {col!r}")
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise VisaeError(f"{what} {path}: column {col!r} is not numeric")
    return df


def _csv_identity(df: pd.DataFrame, path: Path, what: str, rerun: str) -> Identity:
    """The identity a CSV's leading columns carry (one value each, on every row)."""
    missing = [c for c in IDENTITY_COLUMNS if c not in df.columns]
    if missing:
        raise VisaeError(f"{what} {path} lacks identity column(s) {', '.join(missing)}: it was written "
                         f"by an older visae; rerun {rerun}")
    values = {}
    for col in IDENTITY_COLUMNS:
        distinct = df[col].drop_duplicates().tolist()
        if len(distinct) != 1:
            raise VisaeError(f"{what} {path}: column {col!r} must hold one value, has {len(distinct)}")
        values[col] = distinct[0]
    return Identity.from_file({"identity": values}, f"{what} {path}")


def load_latents(path: str | Path) -> tuple[Identity, np.ndarray]:
    """(identity, per-latent firing frequencies) of an evaluation's latents.csv."""
    path = Path(path)
    df = read_csv(path, "latents file", ("latent", "frequency"), text=IDENTITY_COLUMNS)
    ident = _csv_identity(df, path, "latents file", "visae evaluate")
    freq = df["frequency"].to_numpy(dtype=np.float64)
    if len(freq) == 0 or not np.all(np.isfinite(freq)) or (freq < 0).any() or (freq > 1).any():
        raise VisaeError(f"latents file {path}: frequencies must be a non-empty list in [0, 1]")
    return ident, freq


def match_latents(rows: list[Row], latents) -> dict[tuple, np.ndarray]:
    """Map each latents.csv to the row of the same identity (model, dataset, layer, SAE, store hash)."""
    by_ident = {(r.model, r.dataset, layer_dir(r.layer), r.sae, r.store_hash): r for r in rows}
    out = {}
    for p in latents or []:
        p = Path(p)
        ident, freq = load_latents(p)
        row = by_ident.get((ident.model, ident.dataset, layer_dir(ident.layer), ident.sae, ident.store_hash))
        if row is None:
            raise VisaeError(f"latents file {p} ({ident.key}, store {ident.store_hash[:12]}) matches none of "
                             f"the --metrics files")
        if len(freq) != row.width:
            raise VisaeError(f"latents file {p} has {len(freq)} latents but {row.path} says width {row.width}")
        out[row.key] = freq
    return out


def load_log(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """(identity, per-step frame) of an SAE's training log.csv, whose leading columns name the SAE
    (identity and architecture), as latents.csv's do."""
    path = Path(path)
    df = read_csv(path, "training log", ("tokens", "mse", "l0"), text=(*IDENTITY_COLUMNS, "architecture"))
    ident = _csv_identity(df, path, "training log", "visae train")
    if df.empty or "architecture" not in df.columns:
        raise VisaeError(f"training log {path} has no rows or no 'architecture' column")
    return {"model": ident.model, "dataset": ident.dataset, "layer": ident.layer, "sae": ident.sae,
            "architecture": str(df["architecture"].iloc[0])}, df

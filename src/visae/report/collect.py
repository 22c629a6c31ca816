"""Reading the report's inputs: metrics.json, latents.csv and log.csv, with one-line errors.

See the package docstring for where each row's (model, dataset, layer, sae) and k/λ come from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from visae.errors import VisaeError

# Keys a metrics.json must have, with the table column each feeds.
REQUIRED_METRICS = ("architecture", "width", "l0", "mse", "nmse", "explained_variance", "dead_fraction",
                    "dense_fraction")
NUMERIC_METRICS = REQUIRED_METRICS[1:]
# The λ key of penalised architectures in a grid entry (as in visae.sae.train.SPARSITY_KEY).
SPARSITY_KEY = {"relu": "l1", "jumprelu": "l0"}
LAYER_DIR = re.compile(r"^layer_?(-?\d+)$")


@dataclass
class Row:
    """One evaluated SAE: its identity, hyperparameters and metrics."""

    model: str
    dataset: str
    layer: int | str
    sae: str
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
    origin: dict = field(default_factory=dict)  # field -> "metrics" | "checkpoint" | "path"

    @property
    def key(self) -> tuple:
        return (self.model, self.dataset, _layer_key(self.layer), self.sae)

    @property
    def label(self) -> str:
        return f"{self.sae} ({self.dataset}, layer {self.layer})"


def _layer_key(layer) -> tuple:
    return (0, layer, "") if isinstance(layer, int) else (1, 0, str(layer))


def _as_layer(value):
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    s = str(value)
    return int(s) if re.fullmatch(r"-?\d+", s) else s


def model_slug(model: str) -> str:
    """The model name as it appears in figure file names."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(model)) or "_"


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


def _checkpoint_config(metrics_path: Path) -> dict | None:
    """The SAE checkpoint's config.json for an evaluation, if it can be found (see package docstring)."""
    candidates = []
    prov = metrics_path.parent / "provenance.json"
    if prov.is_file():
        try:
            sae = json.loads(prov.read_text()).get("config", {}).get("sae")
        except (ValueError, UnicodeDecodeError, AttributeError):
            sae = None
        if isinstance(sae, str) and sae:
            candidates.append(Path(sae))
    parts = metrics_path.parent.parts
    if "evaluate" in parts:
        i = len(parts) - 1 - parts[::-1].index("evaluate")
        candidates.append(Path(*parts[:i], "saes", *parts[i + 1:]))
    for directory in candidates:
        cfg = directory / "config.json"
        if cfg.is_file():
            try:
                obj = json.loads(cfg.read_text())
            except (ValueError, UnicodeDecodeError):
                raise VisaeError(f"SAE config {cfg} (for {metrics_path}) is not valid JSON") from None
            if isinstance(obj, dict):
                return obj
    return None


def _from_path(path: Path) -> dict:
    """model/dataset/layer/sae from `.../<model>/<dataset>/layer_<L>/<sae>/<file>`, where it matches."""
    parts = path.parent.parts
    if len(parts) >= 4:
        m = LAYER_DIR.match(parts[-2])
        if m:
            return {"model": parts[-4], "dataset": parts[-3], "layer": int(m.group(1)), "sae": parts[-1]}
    return {}


def _named(value):
    """Stores describe their model and dataset as dicts (from meta.json); rows use the name."""
    return value.get("name") if isinstance(value, dict) else value


def _pick(origin: dict, name: str, sources: list[tuple[str, dict]]):
    for label, src in sources:
        value = _named(src.get(name))
        if value is not None and value != "":
            origin[name] = label
            return value
    return None


def _dicts(obj: dict, *keys: str) -> list[dict]:
    out = [obj]
    for key in keys:
        sub = obj.get(key)
        if isinstance(sub, dict):
            out.append(sub)
    return out


def load_metrics(path: str | Path) -> Row:
    path = Path(path)
    m = read_json(path, "metrics file")
    for key in REQUIRED_METRICS:
        if key not in m:
            raise VisaeError(f"metrics file {path} lacks required key {key!r}")
    for key in NUMERIC_METRICS:
        _number(path, key, m[key])
    arch = str(m["architecture"])
    cfg = _checkpoint_config(path) or {}
    from_path = _from_path(path)
    origin: dict = {}
    # identity: metrics content, then checkpoint config, then path
    ident_sources = [("metrics", d) for d in _dicts(m, "source")] + \
                    [("checkpoint", d) for d in _dicts(cfg, "source")] + [("path", from_path)]
    ident = {name: _pick(origin, name, ident_sources) for name in ("model", "dataset", "layer")}
    missing = [name for name, v in ident.items() if v is None]
    if missing:
        raise VisaeError(f"metrics file {path}: cannot tell its {'/'.join(missing)} (not in the file, no SAE "
                         f"checkpoint config found, path not .../<model>/<dataset>/layer_<L>/<sae>/metrics.json)")
    sae = _pick(origin, "sae", [("metrics", m), ("checkpoint", {"sae": cfg.get("name")}),
                               ("path", {"sae": path.parent.name})])
    # hyperparameters: metrics content, then checkpoint config
    hp_sources = [("metrics", d) for d in _dicts(m, "entry", "hparams")] + \
                 [("checkpoint", d) for d in _dicts(cfg, "entry", "hparams")]
    k = _pick(origin, "k", hp_sources)
    lam = _pick(origin, "lambda", [(lbl, {"lambda": d.get("lambda", d.get(SPARSITY_KEY.get(arch, "lambda")))})
                                   for lbl, d in hp_sources])
    hist = m.get("log10_freq_hist")
    return Row(model=str(ident["model"]), dataset=str(ident["dataset"]), layer=_as_layer(ident["layer"]),
               sae=str(sae), architecture=arch, width=int(m["width"]),
               k=None if k is None else int(_number(path, "k", k)),
               lam=None if lam is None else float(_number(path, "lambda", lam)),
               l0=float(m["l0"]), mse=float(m["mse"]), nmse=float(m["nmse"]),
               explained_variance=float(m["explained_variance"]), dead_fraction=float(m["dead_fraction"]),
               dense_fraction=float(m["dense_fraction"]), path=path,
               hist=hist if isinstance(hist, dict) else None, origin=origin)


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


def _read_csv(path: Path, what: str, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise VisaeError(f"{what} {path} does not exist")
    try:
        df = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise VisaeError(f"{what} {path} is not a readable CSV ({str(err).splitlines()[0]})") from None
    for col in columns:
        if col not in df.columns:
            raise VisaeError(f"{what} {path} lacks column {col!r}")
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise VisaeError(f"{what} {path}: column {col!r} is not numeric")
    return df


def load_latents(path: str | Path) -> np.ndarray:
    """Per-latent firing frequencies from an evaluation's latents.csv."""
    path = Path(path)
    df = _read_csv(path, "latents file", ("latent", "frequency"))
    freq = df["frequency"].to_numpy(dtype=np.float64)
    if len(freq) == 0 or not np.all(np.isfinite(freq)) or (freq < 0).any() or (freq > 1).any():
        raise VisaeError(f"latents file {path}: frequencies must be a non-empty list in [0, 1]")
    return freq


def match_latents(rows: list[Row], latents) -> dict[tuple, np.ndarray]:
    """Map each latents.csv to the row whose metrics.json is in the same folder."""
    by_dir = {r.path.parent.resolve(): r for r in rows}
    out = {}
    for p in latents or []:
        p = Path(p)
        row = by_dir.get(p.parent.resolve())
        if row is None:
            raise VisaeError(f"latents file {p} has no metrics.json among --metrics in its folder")
        freq = load_latents(p)
        if len(freq) != row.width:
            raise VisaeError(f"latents file {p} has {len(freq)} latents but {row.path} says width {row.width}")
        out[row.key] = freq
    return out


def load_log(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """(identity, per-step frame) of an SAE's training log.csv; identity from the checkpoint's
    config.json beside it, else from the path."""
    path = Path(path)
    df = _read_csv(path, "training log", ("tokens", "mse", "l0"))
    cfg_path = path.parent / "config.json"
    cfg = read_json(cfg_path, "SAE config") if cfg_path.is_file() else {}
    src = cfg.get("source") if isinstance(cfg.get("source"), dict) else {}
    guess = _from_path(path)
    ident = {}
    for name in ("model", "dataset", "layer"):
        ident[name] = _named(src.get(name)) if _named(src.get(name)) not in (None, "") else guess.get(name)
        if ident[name] is None:
            raise VisaeError(f"training log {path}: cannot tell its {name} (no config.json beside it with "
                             f"source.{name}, path not .../<model>/<dataset>/layer_<L>/<sae>/log.csv)")
    ident["layer"] = _as_layer(ident["layer"])
    ident["model"], ident["dataset"] = str(ident["model"]), str(ident["dataset"])
    ident["sae"] = str(cfg.get("name") or path.parent.name)
    ident["architecture"] = str(cfg.get("architecture", "?"))
    return ident, df

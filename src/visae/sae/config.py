"""The SAE grid's keys, defined once: a config dataclass per architecture.

Each field is one key of a grid entry (`saes:` in the workflow config, `--grid` of `visae train`):
its type, its default (none: required), its range or allowed values (field metadata) and, for
penalised architectures, which key is the sparsity coefficient λ. `validate_grid` checks entries
against these, the JSON schema's `saes` section is held equal to them (tests/test_sae_config.py,
`schema_properties`), and the modules' constructor defaults are the architecture fields' defaults.

Only the common keys' defaults are filled into an entry (what config.json records as `entry`);
an architecture key left out is left to its module (the same default, documented here).
An entry with `import:` is an SAE trained elsewhere (`ImportedConfig`: a saev file or a SAELens
folder); `visae sae import` writes its checkpoint where `visae train` would, and everything after
treats it as a trained SAE. No torch here: the workflow imports this at parse time.
"""

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass

from visae.errors import VisaeError

# Initialisations of (W_enc, W_dec), the first the default; see `visae.sae.modules.init_weights`.
INITS = ("tied-0.1", "tied", "kaiming")
B_DEC_INITS = ("mean", "zero")  # b_dec starts at the data mean (the recipe), or at zero (what saev ran)
IMPORT_FORMATS = ("saev", "saelens")  # what an `import:` entry reads (visae.sae.interop)


def key(default=MISSING, *, doc: str = "", minimum=None, exclusive_minimum=None, maximum=None,
        exclusive_maximum=None, enum=None, items: dict | None = None, length: int | None = None,
        sparsity: bool = False, at_most_width: bool = False, train_default: bool = False, pattern: str | None = None):
    """A grid key. Ranges as JSON schema has them; `items`: the range of a list's entries; `pattern`: a string's;
    `sparsity`: the architecture's λ; `at_most_width`: may not exceed the SAE width;
    `train_default`: the workflow's `train:` section may give it for every entry."""
    meta = {"doc": doc, "minimum": minimum, "exclusiveMinimum": exclusive_minimum, "maximum": maximum,
            "exclusiveMaximum": exclusive_maximum, "enum": enum, "items": items, "length": length,
            "sparsity": sparsity, "at_most_width": at_most_width, "train_default": train_default,
            "pattern": pattern}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """The keys every architecture takes."""
    name: str = key(doc="names the SAE's folder: letters, digits and _ . = + -")
    architecture: str = key(enum=("relu", "topk", "batchtopk", "jumprelu", "matryoshka"))
    expansion: float = key(32, exclusive_minimum=0, doc="width = round(expansion x d_model), unless width is given")
    width: int | None = key(None, exclusive_minimum=0, doc="number of latents (wins over expansion)")
    lr: float = key(3e-4, exclusive_minimum=0)
    lr_warmup: int = key(500, minimum=0, train_default=True, doc="steps of linear LR warm-up")
    l1_warmup: int = key(500, minimum=0, train_default=True, doc="steps of linear warm-up of the sparsity coefficient")
    tokens: int = key(100_000_000, exclusive_minimum=0, train_default=True)
    batch_size: int = key(16384, exclusive_minimum=0, train_default=True)
    seed: int | None = key(None, minimum=0, doc="the SAE's initialisation seed (default: derived from its name; "
                                                "give entries one seed to share their initial weights)")
    init: str = key(INITS[0], enum=INITS, doc="initial weights: tied-0.1 (W_enc = 0.1 W_dec^T), tied "
                                              "(W_enc = W_dec^T), kaiming (the paper's, saev 2284f52)")
    b_dec_init: str = key("mean", enum=B_DEC_INITS, doc="b_dec starts at the training data's mean or at "
                                                       "zero (what saev 2284f52 ran)")
    normalize: bool = key(True, doc="train on (x - mu) / scale, estimated from the training split")
    adam_betas: list[float] = key([0.9, 0.999], items={"minimum": 0, "exclusiveMaximum": 1}, length=2)


@dataclass(frozen=True, kw_only=True)
class ReLUConfig(SAEConfig):
    """The paper's recipe: ReLU + L1."""
    l1: float = key(minimum=0, sparsity=True, doc="the L1 coefficient λ")


@dataclass(frozen=True, kw_only=True)
class TopKConfig(SAEConfig):
    """TopK with the AuxK loss (Gao et al. 2024)."""
    k: int = key(exclusive_minimum=0, at_most_width=True, doc="latents kept per token")
    k_aux: int | None = key(None, exclusive_minimum=0, at_most_width=True,
                            doc="dead latents the AuxK loss uses (default: d_model / 2)")
    aux_alpha: float = key(1 / 32, minimum=0, doc="weight of the AuxK loss")
    dead_tokens: int = key(10_000_000, exclusive_minimum=0, doc="a latent unfired for this many tokens is dead")


@dataclass(frozen=True, kw_only=True)
class BatchTopKConfig(TopKConfig):
    """BatchTopK (Bussmann et al. 2024): k·B over the batch in training, a threshold at inference."""
    threshold_momentum: float = key(0.99, minimum=0, maximum=1, doc="the inference threshold's running-average momentum")


@dataclass(frozen=True, kw_only=True)
class JumpReLUConfig(SAEConfig):
    """JumpReLU (Rajamanoharan et al. 2024) with an L0 penalty."""
    l0: float = key(minimum=0, sparsity=True, doc="the L0 coefficient λ")
    threshold_init: float = key(0.1, minimum=0, doc="every latent's initial threshold")
    bandwidth: float = key(0.05, exclusive_minimum=0, doc="the straight-through estimator's kernel width")


@dataclass(frozen=True, kw_only=True)
class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka (Bussmann et al. 2025): nested prefixes of the latents each reconstruct x."""
    inner: str = key("batchtopk", enum=("topk", "batchtopk"), doc="the sparse code's selection")
    prefixes: list[float] | None = key(None, items={"exclusiveMinimum": 0, "maximum": 1},
                                       doc="nested prefix sizes as fractions of the width in (0, 1] (default: 1/8, "
                                           "1/4, 1/2, 1; the full width is always one)")


@dataclass(frozen=True, kw_only=True)
class ImportedConfig:
    """An SAE trained elsewhere, evaluated like a trained one. The entry's key is `import` (a Python
    keyword: the field is `import_`)."""
    name: str = key(doc="names the SAE's folder: letters, digits and _ . = + -")
    import_: str = key(enum=IMPORT_FORMATS, doc="the source's format: saev (a checkpoint file) or saelens (a folder "
                                                "with cfg.json and sae_weights.safetensors)")
    path: str | dict = key(doc="the saev file or SAELens folder to import, or a mapping model -> file (an SAE "
                               "fits one model: a config of several models names one per model)")
    sha256: str | dict | None = key(None, pattern="^[0-9a-f]{64}$",
                                    doc="the source's expected sha256 (saev: the file; SAELens: sae_weights.safetensors"
                                        "), or a mapping model -> sha256; an import whose source differs is refused")


CONFIGS: dict[str, type[SAEConfig]] = {"relu": ReLUConfig, "topk": TopKConfig, "batchtopk": BatchTopKConfig,
                                       "jumprelu": JumpReLUConfig, "matryoshka": MatryoshkaConfig}
ARCHITECTURES = tuple(CONFIGS)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _default(f: dataclasses.Field):
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


COMMON = _fields(SAEConfig)
# Defaults every entry gets (None: required, or for `seed`: derived from the entry's name).
COMMON_DEFAULTS = {name: _default(f) for name, f in COMMON.items()}
# Per architecture: its own keys, those required, those forwarded to the module's constructor, its λ.
ARCH_FIELDS = {a: {n: f for n, f in _fields(c).items() if n not in COMMON} for a, c in CONFIGS.items()}
REQUIRED = {a: tuple(n for n, f in fs.items() if f.default is MISSING and f.default_factory is MISSING)
            for a, fs in ARCH_FIELDS.items()}
SPARSITY_KEY = {a: n for a, fs in ARCH_FIELDS.items() for n, f in fs.items() if f.metadata["sparsity"]}
ARCH_KEYS = {a: tuple(n for n, f in fs.items() if not f.metadata["sparsity"]) for a, fs in ARCH_FIELDS.items()}
TRAIN_DEFAULTS = tuple(n for n, f in COMMON.items() if f.metadata["train_default"])
# An imported entry's keys (`import` for the field `import_`) and those it requires.
IMPORT_FIELDS = {n.rstrip("_"): f for n, f in _fields(ImportedConfig).items()}
IMPORT_REQUIRED = ("import", "path")
# Per architecture, the keys that may not exceed the SAE's width (checked at plan time too).
AT_MOST_WIDTH = {a: tuple(n for n, f in fs.items() if f.metadata["at_most_width"]) for a, fs in ARCH_FIELDS.items()}


def _base_type(f: dataclasses.Field):
    """(type, nullable) of a field: int | None -> (int, True); list[float] -> (list, False)."""
    args = typing.get_args(f.type) if isinstance(f.type, types.UnionType) else (f.type,)
    base = [a for a in args if a is not type(None)][0]
    return typing.get_origin(base) or base, len(args) > 1


# -- the JSON schema's view -------------------------------------------------------------------
_JSON_TYPE = {int: "integer", float: "number", bool: "boolean", str: "string", list: "array"}
_RANGES = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


def field_schema(f: dataclasses.Field, describe: bool = True) -> dict:
    """The JSON schema of one key. Its default goes in the description, not in `default`, which
    Snakemake would write into every entry (and so into every job's command)."""
    m, (base, nullable) = f.metadata, _base_type(f)
    if m["enum"]:
        out = {"enum": list(m["enum"])}
    else:
        out = {"type": [_JSON_TYPE[base], "null"] if nullable else _JSON_TYPE[base]}
    out.update({r: m[r] for r in _RANGES if m[r] is not None})
    if m["pattern"]:
        out["pattern"] = m["pattern"]
    if base is list:
        out["items"] = {"type": "number", **(m["items"] or {})}
        out["minItems"] = m["length"] or 1
        if m["length"]:
            out["maxItems"] = m["length"]
    if describe:
        default = _default(f)
        text = "; ".join(filter(None, [m["doc"], None if default is None else f"default: {json.dumps(default)}"]))
        if text:
            out["description"] = text
    return out


def schema_properties() -> dict:
    """Every architecture's keys as the schema's `saes` entries list them (without `name`, the
    entry's mapping key)."""
    out = {}
    for fs in ({**COMMON, **ARCH_FIELDS[a]} for a in ARCHITECTURES):
        for name, f in fs.items():
            if name != "name":
                out.setdefault(name, field_schema(f))
    return out


def schema_required() -> list:
    """Per architecture, its required keys, as JSON schema if/then rules."""
    return [{"if": {"properties": {"architecture": {"const": a}}}, "then": {"required": list(REQUIRED[a])}}
            for a in ARCHITECTURES if REQUIRED[a]]


def schema_import_properties() -> dict:
    """An imported entry's keys as the schema's `saes` entries list them (without `name`); `path`
    and `sha256` are a string or a mapping model -> string."""
    out = {name: field_schema(f) for name, f in IMPORT_FIELDS.items() if name != "name"}
    for name in ("path", "sha256"):
        value = {"type": "string", **({"pattern": out[name]["pattern"]} if "pattern" in out[name] else {})}
        out[name]["type"] = ["string", "object"] + (["null"] if name == "sha256" else [])
        out[name]["additionalProperties"] = value
    return out


def is_imported(entry) -> bool:
    """Whether a grid entry is an SAE trained elsewhere (`import:`), not one to train."""
    return isinstance(entry, dict) and "import" in entry


# -- the workflow's import rule (workflow/rules/train.smk): an imported SAE is a pass of its own ---
def for_model(value, model: str):
    """An imported entry's `path` or `sha256` for one model: the value, or the model's in a mapping."""
    return value.get(model) if isinstance(value, dict) else value


def import_files(entry: dict, model: str) -> list[str]:
    """The files `visae sae import` reads for `model` (the rule's inputs: a changed file reruns it)."""
    path = for_model(entry["path"], model)
    return [path] if entry["import"] == "saev" else [f"{path}/cfg.json", f"{path}/sae_weights.safetensors"]


def import_flags(name: str, entry: dict, model: str) -> str:
    """`--format --path --name [--sha256]` of `visae sae import` for one model's import."""
    import shlex

    sha = for_model(entry.get("sha256"), model)
    return (f"--format {entry['import']} --path {shlex.quote(for_model(entry['path'], model))} "
            f"--name {shlex.quote(name)}" + (f" --sha256 {sha}" if sha else ""))


def pass_pattern(imported: list[str], *, trained: bool) -> str:
    """The wildcard constraint that gives a pass to one rule: the imported SAEs' passes to the import
    rule, every other to `train` (the pass folder is followed by "/" in the marker's path)."""
    if not imported:
        return "[^/]+" if trained else "(?!)"
    names = "|".join(re.escape(name) for name in sorted(imported))
    return rf"(?!(?:{names})/)[^/]+" if trained else rf"(?:{names})"


# -- grid validation ----------------------------------------------------------------------------
def _fail(i: int, entry, msg: str):
    name = entry.get("name") if isinstance(entry, dict) else None
    who = f"grid entry {name!r}" if name else f"grid entry #{i + 1}"
    raise VisaeError(f"{who}: {msg}")


def _interval(m: dict) -> str:
    lo = (f"({m['exclusiveMinimum']}" if m.get("exclusiveMinimum") is not None
          else f"[{m['minimum']}" if m.get("minimum") is not None else "(-inf")
    hi = (f"{m['exclusiveMaximum']})" if m.get("exclusiveMaximum") is not None
          else f"{m['maximum']}]" if m.get("maximum") is not None else "inf)")
    return f"{lo}, {hi}"


def _in_range(v, m: dict) -> bool:
    return not ((m.get("minimum") is not None and v < m["minimum"])
                or (m.get("exclusiveMinimum") is not None and v <= m["exclusiveMinimum"])
                or (m.get("maximum") is not None and v > m["maximum"])
                or (m.get("exclusiveMaximum") is not None and v >= m["exclusiveMaximum"]))


def _number(i, e, key, kind, m: dict, label: str):
    v = e[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        _fail(i, e, f"key {key!r} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        _fail(i, e, f"key {key!r} must be finite, got {v!r}")
    if not _in_range(v, m):
        if m.get("exclusiveMinimum") == 0 and m.get("maximum") is None:
            rule = "must be positive"
        elif m.get("minimum") == 0 and m.get("maximum") is None:
            rule = "must be >= 0"
        else:
            rule = f"must be in {_interval(m)}"
        _fail(i, e, f"key {label} {rule}, got {v!r}")
    return kind(v)


def _check(i: int, e: dict, key: str, f: dataclasses.Field, d_model: int) -> None:
    """Check (and for numbers, convert to the field's type) one present, non-null key."""
    m, (base, _) = f.metadata, _base_type(f)
    v = e[key]
    if m["enum"]:
        if v not in m["enum"]:
            _fail(i, e, f"key {key!r} is {v!r}; allowed: {', '.join(m['enum'])}")
    elif base is bool:
        if not isinstance(v, bool):
            _fail(i, e, f"key {key!r} must be true or false, got {v!r}")
    elif base is list:
        r = m["items"]
        if (not isinstance(v, list) or (m["length"] and len(v) != m["length"]) or not v
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and _in_range(x, r) for x in v)):
            _fail(i, e, f"key {key!r} must be a list of {m['length'] or ''}{' ' if m['length'] else ''}numbers "
                        f"in {_interval(r)}, got {v!r}")
    elif base in (int, float):
        label = f"{key!r} (the sparsity coefficient λ)" if m["sparsity"] else repr(key)
        e[key] = _number(i, e, key, base, m, label)
    if m["at_most_width"] and e[key] > e["width"]:
        extra = f" (d_model {d_model} x expansion {e['expansion']})" if key == "k" else ""
        _fail(i, e, f"key {key!r} = {e[key]} exceeds the SAE width {e['width']}{extra}")


def validate_imported(i: int, entry: dict) -> dict:
    """Check an `import:` entry against ImportedConfig (no defaults to fill: it trains nothing)."""
    for k in entry:
        if k not in IMPORT_FIELDS:
            _fail(i, entry, f"unknown key {k!r} for an imported SAE; allowed: {', '.join(sorted(IMPORT_FIELDS))}")
    for k in IMPORT_REQUIRED:
        if k not in entry:
            _fail(i, entry, f"missing key {k!r} (required by an imported SAE)")
    if entry["import"] not in IMPORT_FORMATS:
        _fail(i, entry, f"key 'import' is {entry['import']!r}; allowed: {', '.join(IMPORT_FORMATS)}")
    path, sha = entry["path"], entry.get("sha256")
    paths = path if isinstance(path, dict) else {None: path}
    if not paths or not all(isinstance(v, str) and v for v in paths.values()):
        _fail(i, entry, f"key 'path' must be a file or folder, or a mapping model -> file, got {path!r}")
    if sha is not None:
        shas = sha if isinstance(sha, dict) else {None: sha}
        if isinstance(sha, dict) != isinstance(path, dict) or not set(shas) <= set(paths):
            _fail(i, entry, "key 'sha256' must have the shape of 'path' (one value, or a mapping of its models)")
        for v in shas.values():
            if not (isinstance(v, str) and re.fullmatch(IMPORT_FIELDS["sha256"].metadata["pattern"], v)):
                _fail(i, entry, f"key 'sha256' must be 64 lowercase hex digits, got {v!r}")
    return dict(entry)


def validate_grid(grid, d_model: int, allow_import: bool = False) -> list[dict]:
    """Check a grid (a YAML list of `saes:` entries) against the config dataclasses and fill the
    common defaults. Each problem is one line naming the entry and the key. `import:` entries are
    checked against ImportedConfig where `allow_import`, else refused (`visae train` trains)."""
    if isinstance(grid, dict) and "saes" in grid:
        grid = grid["saes"]
    if not isinstance(grid, list) or not grid:
        raise VisaeError("the SAE grid must be a non-empty YAML list of entries (or a mapping with 'saes:')")
    out, names = [], set()
    for i, entry in enumerate(grid):
        if not isinstance(entry, dict):
            raise VisaeError(f"grid entry #{i + 1}: must be a mapping, got {type(entry).__name__}")
        for k in ("name",) if is_imported(entry) else ("name", "architecture"):
            if k not in entry:
                _fail(i, entry, f"missing key {k!r}")
        name = str(entry["name"])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*", name):
            _fail(i, entry, "key 'name' must be letters, digits and _ . = + - (it names a folder)")
        if name in names:
            _fail(i, entry, "key 'name' is used by an earlier entry")
        names.add(name)
        if is_imported(entry):
            if not allow_import:
                _fail(i, entry, f"it is imported (import: {entry['import']}), not trained: `visae sae import` "
                                f"writes its checkpoint")
            if "architecture" in entry:
                _fail(i, entry, "an imported SAE takes its architecture from its source: remove key 'architecture'")
            out.append(validate_imported(i, entry))
            continue
        arch = entry["architecture"]
        if arch not in ARCHITECTURES:
            _fail(i, entry, f"key 'architecture' is {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
        allowed = set(COMMON) | set(ARCH_FIELDS[arch])
        for k in entry:
            if k not in allowed:
                _fail(i, entry, f"unknown key {k!r} for architecture {arch!r}; allowed: {', '.join(sorted(allowed))}")
        for k in REQUIRED[arch]:
            if k not in entry:
                _fail(i, entry, f"missing key {k!r} (required by architecture {arch!r})")
        e = {**COMMON_DEFAULTS, **entry}
        for k, f in COMMON.items():
            if k not in ("name", "architecture", "expansion", "width") and e[k] is not None:
                _check(i, e, k, f, d_model)
        if e["width"] is not None:
            _check(i, e, "width", COMMON["width"], d_model)
        else:
            _check(i, e, "expansion", COMMON["expansion"], d_model)
            e["width"] = int(round(e["expansion"] * d_model))
            if e["width"] < 1:
                _fail(i, e, f"key 'expansion' gives width {e['width']} on d_model {d_model}")
        for k, f in ARCH_FIELDS[arch].items():
            if e.get(k) is not None:
                _check(i, e, k, f, d_model)
        out.append(e)
    trained = [e for e in out if not is_imported(e)]
    sizes = {e["batch_size"] for e in trained}
    if len(sizes) > 1:
        raise VisaeError(f"grid entry {trained[[e['batch_size'] for e in trained].index(max(sizes))]['name']!r}: key "
                         f"'batch_size' differs across the grid ({sorted(sizes)}); one read of the store "
                         f"feeds every SAE, so they must share one batch size")
    return out

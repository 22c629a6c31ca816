"""A store's meta.json as one typed object: the token layout, what made the activations, and the shards.

`StoreMeta.load` checks a store's meta.json (valid JSON, every required key with the right type,
its own digest, shard ranges that tile the images), each problem one line naming the key;
`to_dict`/`dump` give back exactly the JSON that was read or is written, so a store's digest
(`meta_sha256`) is a function of its content alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from visae.atomic import write_json
from visae.errors import VisaeError
from visae.store.format import FORMAT, META_DIGEST, STORE_DTYPES, meta_digest, seal_meta

TOKEN_GROUPS = ("cls", "registers", "patches")  # their order in a model's sequence and in a store


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits in a model's recorded sequence: [cls, registers..., patches (row-major)]."""

    n_cls: int
    n_registers: int
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))

    @property
    def n_prefix(self) -> int:
        return self.n_cls + self.n_registers

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_cls": self.n_cls,
            "n_registers": self.n_registers,
            "grid": list(self.grid),
            "n_prefix": self.n_prefix,
            "n_patches": self.n_patches,
            "n_tokens": self.n_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenLayout":
        """Inverse of `to_dict`, so readers of meta.json get the same object back."""
        return cls(int(d["n_cls"]), int(d["n_registers"]), tuple(d["grid"]))


@dataclass(frozen=True)
class StoreLayout:
    """Which token groups of a model's sequence a store holds, in the order of TOKEN_GROUPS.

    `n_cls`/`n_registers` count the stored ones (0 for a group not stored); `model` is the
    model's whole layout, recorded (with the token and patch order) by stores a model made and
    absent from synthetic ones."""

    n_cls: int
    n_registers: int
    grid: tuple[int, int]
    stored: tuple[str, ...]
    model: TokenLayout | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        object.__setattr__(self, "stored", tuple(self.stored))

    @classmethod
    def patches(cls, grid: tuple[int, int]) -> "StoreLayout":
        """A store of patch tokens only, made by no model (synthetic and benchmark stores)."""
        return cls(0, 0, grid, ("patches",))

    @classmethod
    def of_model(cls, layout: TokenLayout, stored: list[str]) -> "StoreLayout":
        """The groups `stored` of a model's tokens (an extracted store)."""
        return cls(layout.n_cls if "cls" in stored else 0, layout.n_registers if "registers" in stored else 0,
                   layout.grid, tuple(stored), layout)

    def size(self, group: str) -> int:
        """Tokens per image of a group, stored or not."""
        return {"cls": self.n_cls, "registers": self.n_registers, "patches": self.grid[0] * self.grid[1]}[group]

    @property
    def n_tokens(self) -> int:
        """Stored tokens per image."""
        return sum(self.size(g) for g in self.stored)

    def start(self, group: str) -> int:
        """Position of a group's first token within an image's stored tokens."""
        return sum(self.size(g) for g in TOKEN_GROUPS[:TOKEN_GROUPS.index(group)] if g in self.stored)

    def to_dict(self) -> dict[str, Any]:
        d = {"n_cls": self.n_cls, "n_registers": self.n_registers, "grid": list(self.grid),
             "n_tokens": self.n_tokens, "stored": list(self.stored)}
        if self.model is not None:
            d |= {"order": list(TOKEN_GROUPS), "patch_order": "row-major", "model": self.model.to_dict()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreLayout":
        model = TokenLayout.from_dict(d["model"]) if isinstance(d.get("model"), dict) else None
        return cls(int(d["n_cls"]), int(d["n_registers"]), tuple(d["grid"]), tuple(d["stored"]), model)


def model_identity(model: Any) -> dict | None:
    """meta.json's model.identity: which model made the activations (None for synthetic stores)."""
    return model.get("identity") if isinstance(model, dict) else None


@dataclass
class StoreMeta:
    """meta.json. The first block is what the maker of a store says (extract, synth, a bench);
    the second what StoreWriter adds as it writes the shards (None until it does). Keys of
    meta.json this version does not name are kept in `extra` as they were."""

    dtype: str
    d_model: int
    layout: StoreLayout
    model: dict | str | None = None  # extract: name, source, arch, ..., identity; synth: a name
    layer: int | None = None
    layer_requested: int | None = None
    dataset: dict | str | None = None  # extract: name, spec, classes, ..., skipped_images
    transform: str | None = None
    packages: dict | None = None
    synth: dict | None = None  # synth: the planted dictionary's settings
    extra: dict = field(default_factory=dict)
    # written by StoreWriter
    format: str | None = None
    job: dict | None = None
    complete: bool | None = None
    n_images: int | None = None
    shard_images: int | None = None
    n_shards: int | None = None
    shards: list[dict] | None = None

    @property
    def model_identity(self) -> dict | None:
        return model_identity(self.model)

    def to_dict(self) -> dict[str, Any]:
        """meta.json's content without its digest; fields still None are left out."""
        d = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                d.update(value)
            elif value is not None:
                d[f.name] = value.to_dict() if f.name == "layout" else value
        return d

    def sealed(self) -> dict[str, Any]:
        """meta.json as written: the content and its own digest."""
        return seal_meta(self.to_dict())

    def dump(self, path: str | Path) -> None:
        write_json(path, self.sealed())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreMeta":
        """From meta.json's content (its digest dropped); `load` checks it first."""
        names = {f.name for f in fields(cls)} - {"extra", "layout"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in ("layout", META_DIGEST)}
        return cls(layout=StoreLayout.from_dict(d["layout"]), extra=extra, **known)

    @classmethod
    def load(cls, root: str | Path) -> "StoreMeta":
        """The checked meta.json of the store directory `root`."""
        return cls.from_dict(_read_checked(Path(root)))


def _fail(path: Path, msg: str):
    raise VisaeError(f"{path} {msg}: rerun `visae extract` into a fresh folder")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Required keys of meta.json and a check of each value's type.
_META_KEYS = {
    "format": lambda v: v == FORMAT, "complete": lambda v: isinstance(v, bool),
    "dtype": lambda v: v in STORE_DTYPES, "d_model": lambda v: _is_int(v) and v > 0,
    "layout": lambda v: isinstance(v, dict), "n_images": lambda v: _is_int(v) and v > 0,
    "shard_images": lambda v: _is_int(v) and v > 0, "n_shards": lambda v: _is_int(v) and v > 0,
    "shards": lambda v: isinstance(v, list), "job": lambda v: isinstance(v, dict),
    META_DIGEST: lambda v: isinstance(v, str),
}
_LAYOUT_KEYS = {"n_tokens": lambda v: _is_int(v) and v > 0, "n_cls": lambda v: _is_int(v) and v >= 0,
                "n_registers": lambda v: _is_int(v) and v >= 0,
                "stored": lambda v: isinstance(v, list) and all(g in TOKEN_GROUPS for g in v),
                "grid": lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(g) and g > 0 for g in v)}


def _read_checked(root: Path) -> dict:
    """meta.json of a store, checked: valid JSON, every required key with the right type, its own
    digest, and shard ranges that tile the images. Every problem is one line naming the key."""
    path = root / "meta.json"
    if not root.is_dir():
        raise VisaeError(f"activation store {root} does not exist")
    if not path.is_file():
        raise VisaeError(f"{root} is not an activation store (no meta.json)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        _fail(path, f"is not valid JSON ({err})")
    if not isinstance(meta, dict):
        _fail(path, f"must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        _fail(path, f"has format {meta.get('format')!r}, expected {FORMAT!r}")
    for keys, where, obj in ((_META_KEYS, "", meta), (_LAYOUT_KEYS, "layout.", meta.get("layout"))):
        if not isinstance(obj, dict):
            break
        for key, ok in keys.items():
            if key not in obj:
                _fail(path, f"lacks key {where + key!r}")
            if not ok(obj[key]):
                _fail(path, f"has a bad value for key {where + key!r}: {obj[key]!r}")
    _check_shards(path, meta)
    if meta[META_DIGEST] != meta_digest(meta):
        _fail(path, f"does not match its {META_DIGEST} (edited or damaged)")
    stored = StoreLayout.from_dict(meta["layout"]).n_tokens
    if stored != meta["layout"]["n_tokens"]:
        _fail(path, f"has a bad value for key 'layout.n_tokens': {meta['layout']['n_tokens']} "
                    f"(its groups {meta['layout']['stored']} hold {stored} tokens)")
    return meta


def _check_shards(path: Path, meta: dict) -> None:
    """Shard i covers images [i*S, min((i+1)*S, n)); a complete store has all of them."""
    S, n = meta["shard_images"], meta["n_images"]
    if meta["n_shards"] != -(-n // S) or meta["job"].get("n_images", n) != n:
        _fail(path, f"has inconsistent counts (n_images {n}, shard_images {S}, n_shards {meta['n_shards']})")
    for i, shard in enumerate(meta["shards"]):
        ok = (isinstance(shard, dict) and shard.get("index") == i and shard.get("start") == i * S
              and shard.get("stop") == min((i + 1) * S, n) and isinstance(shard.get("files"), dict)
              and shard["files"] and all(isinstance(v, str) for v in shard["files"].values()))
        if not ok:
            _fail(path, f"has a malformed entry shards[{i}]")
    if meta["complete"] and len(meta["shards"]) != meta["n_shards"]:
        _fail(path, f"says complete but lists {len(meta['shards'])} of {meta['n_shards']} shards")

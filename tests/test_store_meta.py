"""A store's meta.json as one typed object (visae.store.meta): what it reads back, what it writes,
and the one line it names a problem with."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from visae.cli import main
from visae.errors import VisaeError
from visae.store import ActivationStore, StoreLayout, StoreMeta, StoreWriter, TokenLayout
from visae.store.format import META_DIGEST, meta_digest

MODEL = TokenLayout(n_cls=1, n_registers=4, grid=(3, 2))  # a ViT with registers: 1 + 4 + 6 tokens


def synth(out, flags: str):
    """A planted-dictionary store, written by `visae synth`."""
    assert main(["synth", "--out", str(out), *flags.split()]) == 0
    return out


def write_store(root, meta: StoreMeta, n_images=5, shard_images=2):
    writer = StoreWriter(root, meta, {"test": 1}, shard_images, n_images)
    writer.open()
    rng = np.random.default_rng(0)
    for i in range(writer.n_shards):
        a, b = writer.shard_range(i)
        writer.write_shard(i, {"acts": rng.standard_normal((b - a, meta.layout.n_tokens, meta.d_model))
                               .astype(np.float16), "labels": np.zeros(b - a, dtype=np.int64)})
    return root


def test_the_model_layout_is_defined_once_and_the_store_imports_no_model_code():
    from visae.models import TokenLayout as models_layout
    assert models_layout is TokenLayout
    code = "import sys, visae.store; print(sorted(m for m in sys.modules if m.startswith('visae.models')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_an_extracted_layout_records_the_model_sequence():
    """The layout an extracted store writes (the keys readers of old stores rely on)."""
    layout = StoreLayout.of_model(MODEL, ["cls", "patches"])
    assert layout.to_dict() == {
        "n_cls": 1, "n_registers": 0, "grid": [3, 2], "n_tokens": 7, "stored": ["cls", "patches"],
        "order": ["cls", "registers", "patches"], "patch_order": "row-major",
        "model": {"n_cls": 1, "n_registers": 4, "grid": [3, 2], "n_prefix": 5, "n_patches": 6, "n_tokens": 11}}
    assert StoreLayout.from_dict(layout.to_dict()) == layout
    # a synthetic store's layout names no model, and so no model order
    assert StoreLayout.patches((1, 16)).to_dict() == {"n_cls": 0, "n_registers": 0, "grid": [1, 16],
                                                       "n_tokens": 16, "stored": ["patches"]}


@pytest.mark.parametrize("stored, positions", [
    (["cls", "registers", "patches"], {"cls": [0], "registers": [1, 2, 3, 4], "patches": list(range(5, 11))}),
    (["registers", "patches"], {"registers": [0, 1, 2, 3], "patches": list(range(4, 10))}),
    (["cls"], {"cls": [0]}),
])
def test_token_positions_follow_the_stored_groups(tmp_path, stored, positions):
    store = ActivationStore(write_store(tmp_path / "s", StoreMeta(dtype="float16", d_model=4,
                                                                  layout=StoreLayout.of_model(MODEL, stored))))
    assert store.tokens_per_image == sum(len(p) for p in positions.values())
    for kind, want in positions.items():
        assert store.token_index(kind).tolist() == want
    assert store.token_index(None).tolist() == list(range(store.tokens_per_image))
    for kind in {"cls", "registers", "patches"} - set(stored):
        with pytest.raises(VisaeError, match=f"has no {kind} tokens"):
            store.token_index(kind)


def test_load_gives_back_exactly_what_was_written(tmp_path):
    """StoreMeta.load(...).dump() reproduces meta.json byte for byte (so the digest is stable),
    keys it does not name included."""
    made = StoreMeta(dtype="float16", d_model=4, model={"name": "vit", "identity": {"arch": "vit"}}, layer=3,
                     layer_requested=-1, dataset={"name": "imgs"},
                     layout=StoreLayout.of_model(MODEL, ["cls", "registers", "patches"]))
    roots = [synth(tmp_path / "synth", "--d 8 --atoms 16 --k 2 --images 6 --tokens-per-image 4 --noise 0.05"),
             write_store(tmp_path / "model", made)]
    for root in roots:
        meta = StoreMeta.load(root)
        meta.dump(tmp_path / "again.json")
        assert (tmp_path / "again.json").read_bytes() == (root / "meta.json").read_bytes()
    assert StoreMeta.load(roots[0]).synth == {"atoms": 16, "k": 2, "noise": 0.05, "seed": 0}
    model = StoreMeta.load(roots[1])
    assert (model.layer, model.layer_requested, model.model_identity) == (3, -1, {"arch": "vit"})
    assert model.layout.model == MODEL and model.complete and model.n_images == 5 and model.n_shards == 3

    raw = json.loads((roots[1] / "meta.json").read_text())
    raw["written_by_a_later_visae"] = {"x": [1, None]}
    raw[META_DIGEST] = meta_digest(raw)
    (roots[1] / "meta.json").write_text(json.dumps(raw))
    kept = StoreMeta.load(roots[1])
    assert kept.extra == {"written_by_a_later_visae": {"x": [1, None]}} and kept.sealed() == raw


def _resealed(root, edit):
    raw = json.loads((root / "meta.json").read_text())
    edit(raw)
    raw[META_DIGEST] = meta_digest(raw)
    (root / "meta.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("edit, key", [
    (lambda m: m["layout"].update(n_tokens=5), "'layout.n_tokens': 5 (its groups ['patches'] hold 4 tokens)"),
    (lambda m: m["layout"].update(stored=["patch"]), "'layout.stored'"),
    (lambda m: m.pop("dtype"), "lacks key 'dtype'"),
    (lambda m: m.update(d_model=True), "'d_model'"),
])
def test_a_bad_meta_json_is_one_line_naming_the_key(tmp_path, edit, key):
    root = synth(tmp_path / "s", "--d 8 --atoms 16 --k 2 --images 6 --tokens-per-image 4")
    _resealed(root, edit)
    with pytest.raises(VisaeError) as err:
        StoreMeta.load(root)
    line = str(err.value)
    assert key in line and "meta.json" in line and "\n" not in line

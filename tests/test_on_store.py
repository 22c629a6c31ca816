"""An SAE on a store (visae.analysis.on_store): the checks, the held-out split and the tokens served."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from visae.analysis.on_store import open_sae_on_store
from visae.cli import main
from visae.errors import VisaeError
from visae.sae.split import split_images
from visae.store import ActivationStore, StoreMeta, StoreWriter

pytestmark = pytest.mark.usefixtures("one_thread")


def synth(out, flags: str):
    """A planted-dictionary store, written by `visae synth`."""
    assert main(["synth", "--out", str(out), *flags.split()]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("on")
    store = synth(root / "store", "--d 8 --atoms 16 --k 2 --images 40 --tokens-per-image 4")
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"name": "topk", "architecture": "topk", "k": 2, "expansion": 2,
                                     "batch_size": 32}]))
    assert main(["train", "--store", str(store), "--grid", str(grid), "--out", str(root / "saes"),
                 "--tokens", "640", "--heldout", "0.25", "--split-seed", "7"]) == 0
    return store, root / "saes" / "topk"


def test_the_sae_s_split_and_tokens(trained):
    store_dir, sae_dir = trained
    on = open_sae_on_store(store_dir, sae_dir)
    assert on.heldout == 0.25 and on.split_seed == 7 and on.mismatch is None
    assert on.held.tolist() == split_images(40, 0.25, 7)[1].tolist() != split_images(40, 0.25, 0)[1].tolist()
    assert on.token_kind == on.config["source"]["token_kind"]
    store = ActivationStore(store_dir)
    want = torch.cat([store.images(i, i + 1)[0] for i in on.held]).float()
    got = torch.cat(list(on.loader(7)))  # every held-out token once, in store order, the last batch short
    assert got.dtype == torch.float32 and torch.equal(got, want)
    smaller = open_sae_on_store(store_dir, sae_dir, heldout=0.1)
    assert set(smaller.held) < set(on.held)


def test_more_than_it_held_out_is_refused(trained):
    with pytest.raises(VisaeError, match=r"--heldout 0.5 would evaluate on images SAE 'topk' was trained on"):
        open_sae_on_store(*trained, heldout=0.5)


def test_a_store_of_another_layer_is_refused_or_named(tmp_path, trained):
    store_dir, sae_dir = trained
    store = ActivationStore(store_dir)
    info = store.info
    writer = StoreWriter(tmp_path / "other", StoreMeta(model=info.model, layer=5, dataset=info.dataset,
                                                       dtype=info.dtype, d_model=info.d_model, layout=info.layout),
                         {"copy": 1}, store.shard_images, store.n_images)
    writer.open()
    for i in range(writer.n_shards):
        a, b = writer.shard_range(i)
        writer.write_shard(i, {"acts": store.images(a, b).numpy(), "labels": store.labels[a:b]})
    with pytest.raises(VisaeError, match="another layer.*--allow-mismatch"):
        open_sae_on_store(tmp_path / "other", sae_dir)
    on = open_sae_on_store(tmp_path / "other", sae_dir, allow_mismatch=True)
    assert "another layer" in on.mismatch
    assert on.held.tolist() == split_images(40, 0.25, 7)[1].tolist()


def test_an_unfinished_checkpoint_is_refused(tmp_path, trained):
    store_dir, sae_dir = trained
    copy = tmp_path / "sae"
    copy.mkdir()
    for f in sae_dir.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "complete": False}))
    with pytest.raises(VisaeError, match="not a finished checkpoint"):
        open_sae_on_store(store_dir, copy)

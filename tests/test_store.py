"""Activation store: atomic shards, verification, and the shuffled token loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visae.cli import main
from visae.errors import VisaeError
from visae.store import ActivationStore, StoreLayout, StoreMeta, StoreWriter, TokenLoader, verify_store

LAYOUT = StoreLayout(n_cls=1, n_registers=0, grid=(2, 2), stored=("cls", "patches"))  # 5 tokens an image


def make_store(root, n_images=10, shard_images=4, d=8, dtype="float16", seed=0, patch_labels=False):
    writer = StoreWriter(root, StoreMeta(dtype=dtype, d_model=d, layout=LAYOUT), {"test": 1},
                         shard_images, n_images)
    writer.open()
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((n_images, 5, d)).astype(np.float16)
    for i in range(writer.n_shards):
        a, b = writer.shard_range(i)
        arrays = {"acts": acts[a:b], "labels": np.arange(a, b, dtype=np.int64) % 3}
        if patch_labels:
            arrays["patch_labels"] = (np.arange(a * 4, b * 4, dtype=np.int16) % 2).reshape(b - a, 4)
        writer.write_shard(i, arrays)
    return acts


def test_store_roundtrip_meta_and_hashes(tmp_path):
    acts = make_store(tmp_path / "s")
    store = ActivationStore(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["complete"] and meta["n_shards"] == 3 and meta["n_images"] == 10
    assert sorted(meta["shards"][0]["files"]) == ["acts_00000.npy", "labels_00000.npy"]
    assert all(len(sha) == 64 for s in meta["shards"] for sha in s["files"].values())
    assert store.n_tokens == 50 and store.d_model == 8 and store.dtype == torch.float16
    assert np.array_equal(store.labels, np.arange(10) % 3)
    assert torch.equal(store.images(2, 7), torch.from_numpy(acts[2:7]))
    assert list(store.token_index("patches")) == [1, 2, 3, 4]
    assert verify_store(tmp_path / "s") == []
    assert not list((tmp_path / "s").glob(".*.tmp"))


def test_verify_names_flipped_byte_and_truncation(tmp_path, capsys):
    make_store(tmp_path / "s")
    shard = tmp_path / "s" / "acts_00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    assert verify_store(tmp_path / "s") == ["acts_00001.npy: checksum mismatch (truncated or tampered)"]
    assert main(["verify", str(tmp_path / "s")]) == 1
    assert "acts_00001.npy: checksum mismatch" in capsys.readouterr().err

    (tmp_path / "s" / "acts_00002.npy").write_bytes(
        (tmp_path / "s" / "acts_00002.npy").read_bytes()[:-20])
    with pytest.raises(VisaeError, match="acts_00002.npy is truncated"):
        ActivationStore(tmp_path / "s")


def test_verify_ok_cli(tmp_path, capsys):
    make_store(tmp_path / "s")
    assert main(["verify", str(tmp_path / "s")]) == 0
    assert "ok (3 shards, 6 files, 10 images)" in capsys.readouterr().out


def test_incomplete_store_is_refused_and_resume_keeps_done_shards(tmp_path):
    writer = StoreWriter(tmp_path / "s", StoreMeta(dtype="float16", d_model=8, layout=LAYOUT), {"v": 1}, 4, 10)
    writer.open()
    writer.write_shard(0, {"acts": np.zeros((4, 5, 8), np.float16), "labels": np.zeros(4, np.int64)})
    with pytest.raises(VisaeError, match=r"incomplete \(1 of 3 shards\)"):
        ActivationStore(tmp_path / "s")
    (tmp_path / "s" / "acts_00001.npy").write_bytes(b"half-written")  # a stray, unrecorded file
    again = StoreWriter(tmp_path / "s", StoreMeta(dtype="float16", d_model=8, layout=LAYOUT), {"v": 1}, 4, 10)
    assert again.open() == 1
    assert not (tmp_path / "s" / "acts_00001.npy").exists()
    other = StoreWriter(tmp_path / "s", StoreMeta(dtype="float16", d_model=8, layout=LAYOUT), {"v": 2}, 4, 10)
    with pytest.raises(VisaeError, match="other settings"):
        other.open()


def test_resume_drops_a_tampered_shard(tmp_path):
    make_store(tmp_path / "s")
    (tmp_path / "s" / "labels_00001.npy").write_bytes(b"x" * 200)
    again = StoreWriter(tmp_path / "s", StoreMeta(dtype="float16", d_model=8, layout=LAYOUT), {"test": 1}, 4, 10)
    assert again.open() == 1


def _tokens(batches):
    return [tuple(row) for b in batches for row in b.tolist()]


@pytest.mark.parametrize("kw", [{}, {"prefetch": False}, {"shuffle": False}, {"buffer_tokens": 12}])
def test_loader_serves_each_token_once_per_epoch(tmp_path, kw):
    acts = make_store(tmp_path / "s")
    loader = TokenLoader(ActivationStore(tmp_path / "s"), 7, seed=3, drop_last=False, **kw)
    batches = list(loader)
    assert [len(b) for b in batches] == [7] * 7 + [1]
    assert all(b.dtype == torch.float32 and b.shape[1] == 8 for b in batches)
    expected = sorted(tuple(r) for r in acts.reshape(-1, 8).astype(np.float32).tolist())
    assert sorted(_tokens(batches)) == expected


def test_loader_shuffles_deterministically(tmp_path):
    make_store(tmp_path / "s", n_images=40, shard_images=16)
    store = ActivationStore(tmp_path / "s")
    a = torch.cat(list(TokenLoader(store, 10, seed=1, buffer_tokens=60)))
    b = torch.cat(list(TokenLoader(store, 10, seed=1, buffer_tokens=60)))
    c = torch.cat(list(TokenLoader(store, 10, seed=2, buffer_tokens=60)))
    plain = torch.cat(list(TokenLoader(store, 10, shuffle=False)))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    assert torch.equal(plain, store.images(0, 40).reshape(-1, 8).float())


def test_loader_resumes_exactly(tmp_path):
    make_store(tmp_path / "s", n_images=30, shard_images=8)
    store = ActivationStore(tmp_path / "s")
    full = list(TokenLoader(store, 9, seed=5, buffer_tokens=40, epochs=3))
    first = TokenLoader(store, 9, seed=5, buffer_tokens=40, epochs=3)
    it = iter(first)
    head = [next(it) for _ in range(23)]  # into the second epoch
    state = json.loads(json.dumps(first.state_dict()))
    second = TokenLoader(store, 9, seed=5, buffer_tokens=40, epochs=3)
    second.load_state_dict(state)
    resumed = head + list(second)
    assert len(resumed) == len(full) and all(torch.equal(x, y) for x, y in zip(resumed, full))



def test_loader_gathers_ahead_across_an_epoch_end(tmp_path):
    """One pool of workers serves every epoch: when the last batch of an epoch is handed out,
    the first 2 x workers batches of the next are already being gathered (a small store
    trained for many epochs never waits on a drained pipeline)."""
    make_store(tmp_path / "s")
    loader = TokenLoader(ActivationStore(tmp_path / "s"), 7, seed=1, epochs=3, workers=2)
    planned, jobs = [], loader._epoch_jobs

    def spy(epoch, skip):
        for rows in jobs(epoch, skip):
            planned.append(epoch)
            yield rows
    loader._epoch_jobs = spy
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    assert loader.state_dict() == {"seed": 1, "epoch": 0, "batch_in_epoch": len(loader)}
    assert planned.count(0) == len(loader) and planned.count(1) == 2 * 2
    assert len(list(it)) == 2 * len(loader) and loader.state_dict()["epoch"] == 3

def test_loader_filters_labels_tokens_and_range(tmp_path):
    acts = make_store(tmp_path / "s", patch_labels=True)
    store = ActivationStore(tmp_path / "s")
    by_label = TokenLoader(store, 1, labels=[1], token_kind="patches", shuffle=False)
    images = [i for i in range(10) if i % 3 == 1]
    expected = acts[images][:, 1:].reshape(-1, 8).astype(np.float32)
    assert np.array_equal(torch.cat(list(by_label)).numpy(), expected)
    cls = torch.cat(list(TokenLoader(store, 2, token_kind="cls", shuffle=False, image_range=(2, 6))))
    assert np.array_equal(cls.numpy(), acts[2:6, 0].astype(np.float32))
    odd = TokenLoader(store, 1, patch_labels=[1], token_kind="patches")
    assert odd.tokens_per_epoch == 20
    with pytest.raises(VisaeError, match="needs token_kind='patches'"):
        TokenLoader(store, 1, patch_labels=[1])
    with pytest.raises(VisaeError, match="fewer than one batch"):
        TokenLoader(store, 100, labels=[0], token_kind="cls")


def test_bf16_and_fp32_stores(tmp_path):
    from visae.store.format import to_storage
    x = torch.randn(4, 5, 8)
    for dtype, torch_dtype in [("bfloat16", torch.bfloat16), ("float32", torch.float32)]:
        writer = StoreWriter(tmp_path / dtype, StoreMeta(dtype=dtype, d_model=8, layout=LAYOUT), {}, 4, 4)
        writer.open()
        writer.write_shard(0, {"acts": to_storage(x, dtype), "labels": np.zeros(4, np.int64)})
        store = ActivationStore(tmp_path / dtype)
        assert store.dtype == torch_dtype
        assert torch.equal(store.images(0, 4), x.to(torch_dtype))
        batch = next(iter(TokenLoader(store, 20, shuffle=False)))
        assert torch.equal(batch, x.to(torch_dtype).float().reshape(-1, 8))



@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_loader_ships_the_store_dtype_and_converts_on_the_device(tmp_path, dtype):
    """Worker-gathered (np.take) and consumer-gathered (index_select) batches, converted on
    the host or shipped in the store's dtype and converted on the device (exercised here
    with the CPU as that device), are the same bytes: the store's values in the requested
    dtype, in the same order."""
    from visae.store.format import to_storage
    x = torch.randn(12, 5, 8)
    writer = StoreWriter(tmp_path / dtype, StoreMeta(dtype=dtype, d_model=8, layout=LAYOUT), {}, 5, 12)
    writer.open()
    for i in range(writer.n_shards):
        a, b = writer.shard_range(i)
        writer.write_shard(i, {"acts": to_storage(x[a:b], dtype), "labels": np.zeros(b - a, np.int64)})
    store = ActivationStore(tmp_path / dtype)
    stored = x.to(store.dtype).reshape(-1, 8)
    for out_dtype in (torch.float32, torch.bfloat16):
        runs = []
        for prefetch, on_device in [(True, False), (False, False), (True, True), (False, True)]:
            loader = TokenLoader(store, 7, seed=4, buffer_tokens=20, epochs=2, dtype=out_dtype, prefetch=prefetch)
            loader.convert_on_device = on_device
            runs.append(list(loader))
        assert all(b.dtype == out_dtype for b in runs[0]) and len(runs[0]) == 2 * (60 // 7)
        assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
        plain = TokenLoader(store, 6, shuffle=False, dtype=out_dtype)
        plain.convert_on_device = True
        assert torch.equal(torch.cat(list(plain)), stored.to(out_dtype))
    # What travels to the device is the store's dtype (bf16 as its int16 bits): half fp32's bytes.
    loader = TokenLoader(store, 6, shuffle=False)
    loader.convert_on_device = True
    host = loader._gather(np.arange(6), loader._host_batch(6))
    assert host.dtype == {"bfloat16": torch.int16}.get(dtype, store.dtype)
    assert torch.equal(loader._typed(host), stored[:6])


def test_loader_for_another_device_ships_raw_batches(tmp_path):
    """A CUDA loader pins its host batches and converts on the device; a CPU one does neither
    (construction touches no GPU). On a device without data ('meta') the conversion still
    happens there: the batch arrives in the requested dtype."""
    make_store(tmp_path / "s")
    store = ActivationStore(tmp_path / "s")
    cuda, cpu = TokenLoader(store, 7, device="cuda"), TokenLoader(store, 7)
    assert (cuda.pin, cuda.convert_on_device) == (True, True) and (cpu.pin, cpu.convert_on_device) == (False, False)
    batch = next(iter(TokenLoader(store, 7, device="meta", dtype=torch.float32)))
    assert (batch.device.type, batch.dtype, tuple(batch.shape)) == ("meta", torch.float32, (7, 8))


def test_loader_workers_follow_the_cpus_it_may_use(monkeypatch):
    from visae.store import loader as loader_mod
    for cpus, workers in [(1, 2), (2, 2), (16, 8), (128, 16)]:
        monkeypatch.setattr(loader_mod.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert loader_mod.default_workers() == workers

def _class_sorted_store(root, n_images=400, n_classes=40):
    """A store in ImageFolder order: labels in blocks of n_images / n_classes images."""
    writer = StoreWriter(root, StoreMeta(dtype="float16", d_model=8, layout=LAYOUT), {"sorted": 1}, 64, n_images)
    writer.open()
    labels = np.repeat(np.arange(n_classes), n_images // n_classes)
    rng = np.random.default_rng(0)
    for i in range(writer.n_shards):
        a, b = writer.shard_range(i)
        acts = rng.standard_normal((b - a, 5, 8)).astype(np.float16)
        acts[:, :, 0] = labels[a:b, None]  # each token says its image's class
        writer.write_shard(i, {"acts": acts, "labels": labels[a:b]})
    return ActivationStore(root), labels


def test_loader_batches_cover_classes_as_a_uniform_sample_does(tmp_path):
    """On a class-sorted store, with a shuffle window of half the store, a batch covers about as
    many classes as the same number of tokens drawn uniformly from the store."""
    store, labels = _class_sorted_store(tmp_path / "s")
    loader = TokenLoader(store, 100, seed=0, buffer_tokens=1000, epochs=3)
    coverage = [len(np.unique(b[:, 0].numpy())) for b in loader]
    token_labels = np.repeat(labels, 5)
    rng = np.random.default_rng(1)
    uniform = [len(np.unique(rng.choice(token_labels, 100, replace=False))) for _ in range(300)]
    assert np.mean(coverage) >= 0.9 * np.mean(uniform), (np.mean(coverage), np.mean(uniform))


def test_loader_serves_exactly_the_given_images(tmp_path):
    acts = make_store(tmp_path / "s")
    images = [7, 1, 4, 8]
    got = torch.cat(list(TokenLoader(ActivationStore(tmp_path / "s"), 3, seed=2, images=images, drop_last=False)))
    expected = sorted(tuple(r) for r in acts[sorted(images)].reshape(-1, 8).astype(np.float32).tolist())
    assert sorted(_tokens([got])) == expected
    with pytest.raises(VisaeError, match="subset of the store"):
        TokenLoader(ActivationStore(tmp_path / "s"), 3, images=[3, 10])


def test_loader_sample_is_uniform_over_the_selection(tmp_path):
    """`sample(n, seed)`: n distinct tokens of the selection, the same for a seed, spread over
    the classes in proportion (the normalisation constants come from it); all of them when n
    exceeds the selection."""
    store, labels = _class_sorted_store(tmp_path / "s")
    images = np.arange(0, 400, 2)  # every other image
    loader = TokenLoader(store, 10, images=images)
    a = torch.cat(list(loader.sample(500, seed=42, chunk=128)))
    b = torch.cat(list(loader.sample(500, seed=42)))
    assert a.shape == (500, 8) and torch.equal(a, b)
    assert len(np.unique(a.numpy(), axis=0)) == 500  # without replacement
    counts = np.bincount(a[:, 0].numpy().astype(int), minlength=40)
    assert counts.min() >= 3 and counts.max() <= 25, counts  # 12.5 expected per class
    every = torch.cat(list(loader.sample(10 ** 6, seed=0)))
    expected = store.images(0, 400)[images].reshape(-1, 8).float()
    assert sorted(_tokens([every])) == sorted(_tokens([expected]))
    only_cls = TokenLoader(store, 1, images=images, labels=[3], token_kind="patches")
    picked = torch.cat(list(only_cls.sample(10, seed=0)))
    assert picked.shape == (10, 8) and (picked[:, 0] == 3).all()

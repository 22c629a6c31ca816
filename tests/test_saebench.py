"""`visae saebench` on a planted store and a hand-built SAE whose latents are known: a class-specific
latent, a parent latent that a child latent absorbs on one fine class (silent there, or, in a
second SAE, firing weakly on every image), background latents that say nothing about the class,
and dead ones."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from visae.analysis.saebench import decoder_cosines, stability
from visae.cli import main
from visae.sae import checkpoint as ckpt
from visae.sae.modules import build_sae
from visae.sae.split import split_record
from visae.store import ActivationStore, StoreLayout, StoreMeta, StoreWriter
from visae.store.format import to_storage

pytestmark = pytest.mark.usefixtures("one_thread")

D, WIDTH, IMAGES, GRID = 64, 64, 600, (4, 4)
CLASSES = ["shoe-a", "shoe-b", "shoe-c", "bag", "hat"]
HIERARCHY = {"groups": {"footwear": ["shoe-a", "shoe-b", "shoe-c"], "bags": ["bag"], "hats": ["hat"]}}
N_GENERIC = 50
P, Q = 50, {c: 51 + c for c in range(5)}  # atom ids: the parent (footwear) and each class's own atom
# latent ids
PARENT, CHILD, OWN = 50, 52, {0: 51, 2: 53, 3: 54, 4: 55}  # class 1's only latent is the child
THRESHOLD = 0.1


def atoms() -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((D, D)))
    return q.T.astype(np.float32)  # orthonormal rows


def planted_tokens(rng) -> tuple[np.ndarray, np.ndarray]:
    """[images, 16, d] tokens and labels. Every image carries background atoms (each atom j in an
    image with its own probability, on 1-3 random patches); 8 random patches carry its class:
    shoe-a and shoe-c the parent atom with their own, shoe-b the parent and its own atom as one
    direction (what its child latent decodes), bag and hat their own atom."""
    A = atoms()
    child = (A[P] + A[Q[1]]) / np.sqrt(2)
    labels = rng.choice(5, IMAGES, p=[0.16, 0.18, 0.2, 0.22, 0.24])
    n_tok = GRID[0] * GRID[1]
    x = np.zeros((IMAGES, n_tok, D), np.float32)
    include = np.linspace(0.08, 0.6, N_GENERIC)
    for i, c in enumerate(labels):
        for j in np.flatnonzero(rng.random(N_GENERIC) < include):
            at = rng.choice(n_tok, rng.integers(1, 4), replace=False)
            x[i, at] += (np.abs(rng.standard_normal(len(at))) + 0.5)[:, None] * A[j]
        obj = rng.choice(n_tok, 8, replace=False)
        jitter = rng.uniform(-0.1, 0.1, (8, 1))
        if c in (0, 2):
            x[i, obj] += (1.5 + jitter) * A[P] + (2.0 + jitter) * A[Q[c]]
        elif c == 1:
            x[i, obj] += (1.5 + jitter) * child
        else:
            x[i, obj] += (2.0 + jitter) * A[Q[c]]
    x += 0.01 * rng.standard_normal(x.shape).astype(np.float32)
    return x, labels


def write_store(out) -> None:
    x, labels = planted_tokens(np.random.default_rng(1))
    meta = StoreMeta(model="planted", layer=0, dataset={"name": "planted", "classes": CLASSES}, dtype="float32",
                     d_model=D, layout=StoreLayout.patches(GRID))
    writer = StoreWriter(out, meta, {"planted": 1}, shard_images=IMAGES // 2, n_images=IMAGES)
    writer.open()
    for s in range(writer.n_shards):
        a, b = writer.shard_range(s)
        writer.write_shard(s, {"acts": to_storage(torch.from_numpy(x[a:b]), "float32"), "labels": labels[a:b]})


def planted_sae(parent_bias: float = -THRESHOLD, width: int = WIDTH):
    """ReLU, mu = 0, scale = 1: each alive latent reads its atom (f = x . a - 0.1) and writes it back;
    the parent is silenced by class 1's own atom, the child reads that atom and writes parent + own.
    A positive `parent_bias` makes the parent dense: it fires that much on every token without
    the parent atom, so on some patch of every image."""
    A = atoms()
    sae = build_sae("relu", D, width, seed=0)
    w_enc, w_dec = np.zeros((D, width), np.float32), np.zeros((width, D), np.float32)
    b_enc = np.full(width, -1.0, np.float32)  # dead unless set below
    for j in range(N_GENERIC):
        w_enc[:, j], w_dec[j] = A[j], A[j]
    for c, latent in OWN.items():
        w_enc[:, latent], w_dec[latent] = A[Q[c]], A[Q[c]]
    w_enc[:, PARENT], w_dec[PARENT] = A[P] - 3 * A[Q[1]], A[P]
    w_enc[:, CHILD], w_dec[CHILD] = np.sqrt(2) * A[Q[1]], (A[P] + A[Q[1]]) / np.sqrt(2)
    b_enc[:56] = -THRESHOLD
    b_enc[PARENT] = parent_bias
    dead = np.random.default_rng(2).standard_normal((width - 56, D))
    w_dec[56:] = dead / np.linalg.norm(dead, axis=1, keepdims=True)
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(w_enc))
        sae.W_dec.copy_(torch.from_numpy(w_dec))
        sae.b_enc.copy_(torch.from_numpy(b_enc))
    return sae


def save_sae(sae, out, name: str, store_hash: str, layer: int = 0) -> None:
    ckpt.save(sae, out, {"name": name, "complete": True, "split": split_record(IMAGES, 0.5, 0),
                         "identity": {"model": "planted", "dataset": "planted", "layer": layer, "sae": name,
                                      "store_hash": store_hash},
                         "source": {"model": "planted", "layer": 0, "token_kind": "patches",
                                    "store_hash": store_hash}})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(root, the run's output folder) with --twin the SAE itself; root holds the store, the SAE,
    its index and twins that are not its second seed."""
    root = tmp_path_factory.mktemp("saebench")
    write_store(root / "store")
    store_hash = ActivationStore(root / "store").store_hash
    save_sae(planted_sae(), root / "sae", "planted", store_hash)
    save_sae(planted_sae(), root / "other-store", "planted.seed1", "0" * 64)
    save_sae(planted_sae(), root / "other-layer", "planted.seed1", store_hash, layer=1)
    save_sae(planted_sae(width=2 * WIDTH), root / "other-width", "planted.seed1", store_hash)
    assert main(["latents", "--store", str(root / "store"), "--sae", str(root / "sae"), "--out",
                 str(root / "index")]) == 0
    out = root / "bench"
    assert main(["saebench", "--index", str(root / "index"), "--twin", str(root / "sae"), "--hierarchy",
                 json.dumps(HIERARCHY), "--k", "1", "2", "5", "--tpp-latents", "2", "--out", str(out)]) == 0
    return root, out


def test_the_run_writes_its_files_with_the_schema(planted):
    _, out = planted
    result = json.loads((out / "saebench.json").read_text())
    assert result["format"] == "visae-saebench/1"
    assert result["identity"]["sae"] == "planted" and result["identity"]["model"] == "planted"
    assert result["architecture"] == "relu" and result["width"] == WIDTH
    keys = {"l0", "sparse_probing_k1", "sparse_probing_k2", "sparse_probing_k5", "sparse_probing_ceiling",
            "sparse_probing_floor_k1", "sparse_probing_floor_k2", "sparse_probing_floor_k5", "tpp", "tpp_std",
            "tpp_random", "tpp_random_std", "absorption", "absorption_random", "shrinkage", "stability",
            "stability_random"}
    assert set(result["metrics"]) == keys
    assert all(isinstance(v, float) for v in result["metrics"].values())
    for part in ("sparse_probing", "tpp", "absorption", "shrinkage", "stability", "params", "provenance"):
        assert isinstance(result[part], dict), part
    assert "hierarchy" in result["absorption"]["adaptation"]
    assert result["images"]["covered"] == IMAGES // 2
    probing = pd.read_csv(out / "sparse_probing.csv")
    assert {"class", "class_name", "k", "method", "accuracy", "latents", "sae", "store_hash"} <= set(probing)
    assert set(probing.method) == {"sae", "random", "ceiling", "ceiling_mean_pooled"}
    assert len(probing) == 5 * (2 + 3 * 2)
    tpp = pd.read_csv(out / "tpp.csv")
    assert {"class", "method", "tpp", "drop", "drop_others"} <= set(tpp)
    for method, key in (("sae", "tpp_std"), ("random", "tpp_random_std")):  # the spread over classes
        assert result["metrics"][key] == pytest.approx(np.std(tpp[tpp.method == method].tpp), abs=1e-5)
    assert {"group", "class_name", "method", "rate", "absorbed", "main_missed"} <= set(
        pd.read_csv(out / "absorption.csv"))


def test_a_class_specific_latent_probes_near_the_ceiling_and_random_latents_near_chance(planted):
    _, out = planted
    rows = pd.read_csv(out / "sparse_probing.csv")
    for c in (3, 4):
        mine = rows[rows["class"] == c]
        ceiling = mine[mine.method == "ceiling"].accuracy.item()
        k1 = mine[(mine.method == "sae") & (mine.k == 1)]
        assert k1.latents.item() == str(OWN[c])
        assert k1.accuracy.item() >= max(0.95, ceiling - 0.03)
    metrics = json.loads((out / "saebench.json").read_text())["metrics"]
    assert metrics["sparse_probing_k1"] > 0.9
    assert abs(metrics["sparse_probing_floor_k1"] - 0.5) < 0.12  # frequency-matched background latents


def test_ablating_a_class_specific_latent_hurts_its_probe_alone(planted):
    _, out = planted
    rows = pd.read_csv(out / "tpp.csv")
    for c in (3, 4):
        sae = rows[(rows["class"] == c) & (rows.method == "sae")].iloc[0]
        rand = rows[(rows["class"] == c) & (rows.method == "random")].iloc[0]
        assert str(OWN[c]) in sae.latents.split()
        assert sae.accuracy > 0.95 and sae.tpp > 0.3 and abs(sae.drop_others) < 0.05
        assert abs(rand.tpp) < 0.1
    metrics = json.loads((out / "saebench.json").read_text())["metrics"]
    assert metrics["tpp"] > metrics["tpp_random"] + 0.15


def test_the_absorbed_fine_class_is_counted(planted):
    _, out = planted
    result = json.loads((out / "saebench.json").read_text())
    (group,) = result["absorption"]["groups"]  # bags and hats have one class each
    assert group["group"] == "footwear" and group["main_latents"] == [PARENT]
    rows = pd.read_csv(out / "absorption.csv")
    sae = rows[rows.method == "sae"].set_index("class_name")
    assert sae.loc["shoe-b"].true_positives > 10 and sae.loc["shoe-b"].rate > 0.9  # the parent is silent there
    assert sae.loc["shoe-a"].rate == 0 and sae.loc["shoe-c"].rate == 0  # it fires there
    whole = rows[(rows.method == "sae") & (rows.level == "group")].iloc[0]
    assert whole.absorbed == sae.loc["shoe-b"].absorbed
    assert result["metrics"]["absorption"] == pytest.approx(whole.rate, rel=1e-5)
    # random main latents say nothing about footwear: their probe misses shoe-a and shoe-c too, where
    # the parent latent carries the direction, so the baseline counts absorption the SAE does not have
    rand = rows[rows.method == "random"].set_index("class_name")
    assert rand.loc["shoe-a"].absorbed + rand.loc["shoe-c"].absorbed > 5
    assert result["metrics"]["absorption_random"] > 0.1


def test_the_ceiling_probes_the_model_pooled_as_the_sae_features_are(planted):
    """The headline ceiling: max over the patches, as the index pools the SAE; mean-pooled beside it."""
    from visae.analysis.latent_index import LatentIndex
    from visae.analysis.saebench import balanced_accuracy, fit_probe, stratified_split

    root, out = planted
    result = json.loads((out / "saebench.json").read_text())
    rows = pd.read_csv(out / "sparse_probing.csv")
    ceiling, mean_pooled = (rows[rows.method == m].set_index("class").accuracy
                            for m in ("ceiling", "ceiling_mean_pooled"))
    assert result["metrics"]["sparse_probing_ceiling"] == pytest.approx(ceiling.mean(), rel=1e-5)
    assert result["sparse_probing"]["ceiling_mean_pooled"]["value"] == pytest.approx(mean_pooled.mean(), rel=1e-5)
    assert "max-pooled" in result["sparse_probing"]["ceiling_features"]
    assert "mean-pooled" in result["tpp"]["probes"]
    index = LatentIndex.load(root / "index")
    x = ActivationStore(root / "store").take(index.images).double().amax(1).numpy()  # [n, d]: max over patches
    train, test = stratified_split(index.labels, 0.5, 0)
    w, b = fit_probe(x[train], index.labels[train] == 3, 0)
    assert ceiling[3] == pytest.approx(float(balanced_accuracy(x[test] @ w + b, index.labels[test] == 3)[0]),
                                       abs=1e-6)


def test_a_dense_main_latent_that_misses_the_absorbed_class_still_counts(planted):
    """The parent fires weakly on every image (so it is never silent at image level) and strongly on
    shoe-a and shoe-c; on shoe-b its probe says no and the child carries the parent direction."""
    root, _ = planted
    save_sae(planted_sae(parent_bias=0.2), root / "dense", "dense", ActivationStore(root / "store").store_hash)
    assert main(["latents", "--store", str(root / "store"), "--sae", str(root / "dense"), "--out",
                 str(root / "dense-index")]) == 0
    from visae.analysis.latent_index import LatentIndex

    index = LatentIndex.load(root / "dense-index")
    assert index.frequency[PARENT] == 1.0  # dense: the old image-level 'silent' rule never fires
    out = root / "dense-bench"
    assert main(["saebench", "--index", str(root / "dense-index"), "--hierarchy", json.dumps(HIERARCHY), "--k", "1",
                 "--tpp-latents", "2", "--out", str(out)]) == 0
    result = json.loads((out / "saebench.json").read_text())
    (group,) = result["absorption"]["groups"]
    assert group["main_latents"] == [PARENT]
    rows = pd.read_csv(out / "absorption.csv")
    sae = rows[rows.method == "sae"].set_index("class_name")
    assert sae.loc["shoe-b"].true_positives > 10
    assert sae.loc["shoe-b"].main_missed == sae.loc["shoe-b"].true_positives and sae.loc["shoe-b"].rate > 0.9
    assert sae.loc["shoe-a"].rate == 0 and sae.loc["shoe-c"].rate == 0
    whole = rows[(rows.method == "sae") & (rows.level == "group")].iloc[0]
    assert result["metrics"]["absorption"] == pytest.approx(whole.rate, rel=1e-5)
    assert 0.2 < whole.rate < 0.5  # shoe-b's share of the footwear hits


def test_a_group_of_every_class_is_left_out_in_a_note(planted):
    root, _ = planted
    out = root / "all"
    assert main(["saebench", "--index", str(root / "index"), "--hierarchy", json.dumps({"groups": {"all": CLASSES}}),
                 "--k", "1", "--tpp-latents", "1", "--out", str(out)]) == 0
    result = json.loads((out / "saebench.json").read_text())
    assert result["metrics"]["absorption"] is None and result["metrics"]["absorption_random"] is None
    assert result["absorption"]["groups"] == []
    assert "group 'all' holds every class" in result["absorption"]["note"]
    assert result["absorption"]["groups_left_out"] == [result["absorption"]["note"].split("; ")[0]]
    assert len(pd.read_csv(out / "absorption.csv")) == 0


def test_shrinkage_and_l0_match_a_dense_computation(planted):
    root, out = planted
    store, sae = ActivationStore(root / "store"), ckpt.load(root / "sae")
    index = json.loads((root / "index" / "index.json").read_text())
    from visae.analysis.latent_index import LatentIndex

    images = LatentIndex.load(root / "index").images
    x = store.take(images).float().reshape(-1, D)
    with torch.no_grad():
        f = sae.encode(x)
        ratio = (sae.decode(f).norm(dim=1) / x.norm(dim=1)).mean()
    metrics = json.loads((out / "saebench.json").read_text())["metrics"]
    assert index["pooled_tokens"] == "patches"
    assert metrics["l0"] == pytest.approx(float((f > 0).sum(1).float().mean()), rel=1e-6)
    assert metrics["shrinkage"] == pytest.approx(float(ratio), rel=1e-5)
    assert 0.8 < metrics["shrinkage"] < 1  # the threshold shrinks every code by 0.1


def test_stability_is_one_with_itself_and_near_zero_with_random_decoders(planted, tmp_path):
    _, out = planted
    metrics = json.loads((out / "saebench.json").read_text())["metrics"]
    assert metrics["stability"] == 1.0 and metrics["stability_random"] < 0.05
    w = planted_sae().W_dec.detach().double().numpy()
    alive = np.ones(WIDTH, bool)
    perm = np.random.default_rng(4).permutation(WIDTH)
    assert stability(w, w[perm], 0.7, alive, 0)["twin"]["share"] == 1.0
    other = build_sae("relu", D, WIDTH, seed=3).W_dec.detach().double().numpy()
    assert stability(w, other, 0.7, alive, 0)["twin"]["share"] < 0.05


def test_the_sparse_assignment_agrees_with_the_dense_one(monkeypatch):
    """A cosine matrix too large for the dense assignment goes through each side's top-k."""
    import visae.analysis.matching as matching

    w = planted_sae().W_dec.detach().double().numpy()
    perm = np.random.default_rng(5).permutation(WIDTH)
    noisy = w[perm] + 0.3 * np.random.default_rng(6).standard_normal(w.shape)
    dense = stability(w, noisy, 0.7, np.ones(WIDTH, bool), 0)["twin"]
    monkeypatch.setattr(matching, "DENSE_LIMIT", 0)
    assert decoder_cosines(w, noisy).dense is None
    sparse = stability(w, noisy, 0.7, np.ones(WIDTH, bool), 0)["twin"]
    assert sparse["assignment"] == "sparse" and dense["assignment"] == "dense"
    assert sparse["share"] == dense["share"]
    assert sparse["mean_matched_cosine"] == pytest.approx(dense["mean_matched_cosine"], rel=1e-6)


def test_without_twin_or_hierarchy_those_fields_are_null_and_the_rest_repeats(planted):
    root, out = planted
    again = root / "again"
    assert main(["saebench", "--index", str(root / "index"), "--k", "1", "2", "5", "--tpp-latents", "2",
                 "--out", str(again)]) == 0
    result = json.loads((again / "saebench.json").read_text())
    assert result["stability"] is None
    assert result["metrics"]["stability"] is None and result["metrics"]["stability_random"] is None
    assert result["metrics"]["absorption"] is None and result["absorption"]["groups"] == []
    assert len(pd.read_csv(again / "absorption.csv")) == 0
    for name in ("sparse_probing.csv", "tpp.csv"):  # the same seed gives the same bytes
        assert (again / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--index", "{root}/nowhere"], "no finished latent index"),
    (["--index", "{root}/index", "--k", "0"], "--k must be a positive integer"),
    (["--index", "{root}/index", "--k", "40"], "alive latents"),
    (["--index", "{root}/index", "--max-classes", "1"], "--max-classes must be an integer >= 2"),
    (["--index", "{root}/index", "--twin", "{root}/nowhere"], "not an SAE checkpoint"),
    (["--index", "{root}/index", "--twin", "{root}/other-store"], "has store_hash " + "0" * 64),
    (["--index", "{root}/index", "--twin", "{root}/other-layer"], "has layer 1 (this SAE: 0)"),
    (["--index", "{root}/index", "--twin", "{root}/other-width"], f"has width {2 * WIDTH} (this SAE: {WIDTH})"),
])
def test_bad_input_is_one_line_and_leaves_no_marker(planted, tmp_path, capsys, args, message):
    root, _ = planted
    out = tmp_path / "out"
    assert main(["saebench", *[a.format(root=root) for a in args], "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (out / "saebench.json").exists()


def test_max_classes_scores_a_seeded_sample_and_the_split_follows_train_fraction(planted):
    root, _ = planted
    out = root / "two"
    assert main(["saebench", "--index", str(root / "index"), "--k", "1", "--tpp-latents", "1", "--max-classes", "2",
                 "--train-fraction", "0.7", "--out", str(out)]) == 0
    result = json.loads((out / "saebench.json").read_text())
    assert len(result["images"]["classes_evaluated"]) == 2
    assert set(pd.read_csv(out / "sparse_probing.csv").class_name) == set(result["images"]["classes_evaluated"])
    assert len(pd.read_csv(out / "tpp.csv")) == 2 * 2
    assert result["images"]["probe_train"] == pytest.approx(0.7 * IMAGES / 2, abs=3)
    assert set(result["metrics"]) >= {"sparse_probing_k1", "sparse_probing_floor_k1"}
    assert "sparse_probing_k2" not in result["metrics"]

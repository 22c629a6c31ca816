"""The comparison's commands end to end on real stores and SAEs: `visae latents`, `profile`,
`compare`, `similarity` and `report compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visae.analysis.latent_index import LatentIndex, build_index, write_index
from visae.cli import main
from visae.sae import checkpoint as ckpt
from visae.tools.synth import synth_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(synth_sae, tmp_path_factory):
    store, sae = synth_sae
    index = tmp_path_factory.mktemp("cmp") / "index"
    assert main(["latents", "--store", str(store), "--sae", str(sae), "--out", str(index)]) == 0
    return index.parent, store, sae, index


def permuted_copy(sae_dir, out, perm: np.ndarray):
    """The same SAE with its latents reordered: latent j of the copy is latent perm[j] of the original."""
    sae = ckpt.load(sae_dir)
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:, perm])
        sae.b_enc.copy_(sae.b_enc[perm])
        sae.W_dec.copy_(sae.W_dec[perm])
    config = json.loads((sae_dir / "config.json").read_text())
    ckpt.save(sae, out, {**config, "name": "relu-permuted"})
    return out


def test_a_permuted_sae_is_matched_back_to_its_permutation(tmp_path, trained):
    root, store, sae, index = trained
    width = LatentIndex.load(index).width
    perm = np.random.default_rng(3).permutation(width)
    twin = permuted_copy(sae, tmp_path / "relu-permuted", perm)
    assert main(["latents", "--store", str(store), "--sae", str(twin), "--out", str(tmp_path / "index_b")]) == 0
    out = tmp_path / "match"
    assert main(["compare", "--a", str(index), "--b", str(tmp_path / "index_b"), "--out", str(out)]) == 0
    summary = json.loads((out / "matching.json").read_text())
    assert summary["kind"] == "same seed"  # one model and layer, and the copy kept the original's seed
    assert summary["matched_fraction"] == 1.0 and summary["null_matched_fraction"] < 0.2
    import pandas as pd

    rows = pd.read_csv(out / "matches.csv")
    a = rows[(rows.side == "a") & (rows.alive == 1)]
    inverse = np.argsort(perm)  # original latent i sits at position inverse[i] of the copy
    assert (a.match.to_numpy() == inverse[a.latent.to_numpy()]).mean() > 0.95
    np.testing.assert_allclose(a.matched_correlation, 1.0, atol=1e-5)


def test_comparing_stores_of_different_image_sets_fails_with_one_line(tmp_path, trained, capsys):
    root, store, sae, index = trained
    other = synth_store(tmp_path / "other", d=16, atoms=32, k=3, images=160, tokens_per_image=16, seed=7,
                        classes=4)
    meta, arrays = build_index(other, sae, allow_mismatch=True)
    write_index(tmp_path / "index_other", meta, arrays, {}, 0.0)
    assert main(["compare", "--a", str(index), "--b", str(tmp_path / "index_other"), "--out",
                 str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different image sets" in err[0]
    assert not (tmp_path / "m" / "matching.json").exists()
    assert main(["similarity", "--a", str(store), "--b", str(other), "--out", str(tmp_path / "s")]) == 1
    assert "different image sets" in capsys.readouterr().err
    assert not (tmp_path / "s" / "similarity.json").exists()


def test_similarity_of_a_model_with_itself_is_one(tmp_path, trained):
    root, store, sae, index = trained
    assert main(["similarity", "--a", str(store), "--b", str(store), "--out", str(tmp_path / "s"), "--knn", "5",
                 "--heldout", "0.5"]) == 0
    result = json.loads((tmp_path / "s" / "similarity.json").read_text())
    (row,) = result["rows"]  # a synth store: patch tokens only, so only the mean-pooled row
    assert row["pool"] == "mean" and result["images"] == 80
    assert row["cka"] == pytest.approx(1.0, abs=1e-6) and row["mutual_knn"] == pytest.approx(1.0)
    assert abs(row["cka_null"]) < 0.2 and row["mutual_knn_null"] < 0.3


def test_profile_and_the_comparison_report(tmp_path, trained):
    root, store, sae, index = trained
    prof = tmp_path / "profile"
    assert main(["profile", "--index", str(index), "--out", str(prof), "--shifts"]) == 0  # no images: no shifts
    p = json.loads((prof / "profile.json").read_text())
    assert p["identity"]["sae"] == "relu" and p["invariance"] is None
    a = p["abstraction"]
    assert 0 <= a["model"]["mean_purity"]["value"] <= 1 and a["model"]["counts"]["abstract"] == 0  # flat tree
    assert a["chance"]["mean_purity"]["value"] < 1
    assert p["concepts"]["summary"]["n_scored"] == 4
    twin = permuted_copy(sae, tmp_path / "relu.seed1", np.arange(LatentIndex.load(index).width)[::-1].copy())
    assert main(["latents", "--store", str(store), "--sae", str(twin), "--out", str(tmp_path / "ib")]) == 0
    assert main(["compare", "--a", str(index), "--b", str(tmp_path / "ib"), "--out", str(tmp_path / "m")]) == 0
    assert main(["similarity", "--a", str(store), "--b", str(store), "--out", str(tmp_path / "s")]) == 0
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    assert main(["report", "compare", "--profiles", str(prof / "profile.json"), "--matchings",
                 str(tmp_path / "m" / "matching.json"), "--similarities", str(tmp_path / "s" / "similarity.json"),
                 "--tables", str(tables), "--figures", str(figures)]) == 0
    import pandas as pd

    profiles = pd.read_csv(tables / "profiles.csv")
    assert profiles.sae.tolist() == ["relu"] and profiles.purity[0] == pytest.approx(a["model"]["mean_purity"]["value"])
    matching = pd.read_csv(tables / "matching.csv")
    assert matching.kind.tolist() == ["same seed"] and matching.matched[0] == 1.0
    for ext in ("md", "tex", "json"):
        assert (tables / f"profiles.{ext}").stat().st_size > 0
    assert (figures / "abstraction_synthetic.png").is_file() and (figures / "invariance_synthetic.pdf").is_file()
    assert (figures / "exemplars_synthetic.png").is_file()  # per model: latents across the frequency range
    from visae.report.comparison import exemplar_latents

    idx = LatentIndex.load(index)
    shown = exemplar_latents(idx, 6, 6)
    eligible = idx.alive & ((idx.top_images[:, :6] >= 0).sum(1) == 6)
    assert len(shown) == 6 and eligible[shown].all() and np.all(np.diff(idx.frequency[shown]) <= 0)
    assert idx.frequency[shown[0]] == idx.frequency[eligible].max()
    assert idx.frequency[shown[-1]] == idx.frequency[eligible].min()
    # a matching's data files are checked against the sha256 matching.json records
    with open(tmp_path / "m" / "matches.csv", "a") as fh:
        fh.write("a,0,0,1,1,0,1\n")
    assert main(["report", "compare", "--matchings", str(tmp_path / "m" / "matching.json"), "--tables",
                 str(tmp_path / "t2"), "--figures", str(tmp_path / "f2")]) == 1


def test_an_sae_retrained_after_its_index_is_refused(tmp_path, trained, capsys):
    root, store, sae, index = trained
    copy = permuted_copy(sae, tmp_path / "relu-copy", np.arange(LatentIndex.load(index).width))
    assert main(["latents", "--store", str(store), "--sae", str(copy), "--out", str(tmp_path / "ix")]) == 0
    permuted_copy(sae, copy, np.arange(LatentIndex.load(index).width)[::-1].copy())  # "retrained" in place
    assert main(["compare", "--a", str(index), "--b", str(tmp_path / "ix"), "--out", str(tmp_path / "m")]) == 1
    assert "changed since the latent index" in capsys.readouterr().err


class _Renditions:
    """A domain dataset's class names and labels (what `domain_sample` reads)."""

    name = "renditions"

    def __init__(self, classes, labels):
        self.classes, self._labels = classes, np.asarray(labels)

    def label_array(self):
        return self._labels


def test_a_domain_dataset_is_mapped_to_the_compared_classes_by_wordnet_id():
    from visae.analysis.profile import domain_sample
    from visae.errors import VisaeError

    ours = ["n01440764_tench", "n01443537", "n09999999 other"]
    domain = _Renditions(["n01443537", "n01440764", "n07777777"], [0, 1, 2, 1, 0, 2])
    picked, labels = domain_sample(ours, domain, max_images=10, seed=0)
    assert picked.tolist() == [0, 1, 3, 4] and labels.tolist() == [1, 0, 0, 1]  # n07777777 is not ours
    few, few_labels = domain_sample(ours, domain, max_images=2, seed=0)
    assert len(few) == 2 and set(few) <= {0, 1, 3, 4}
    assert np.array_equal(few, domain_sample(ours, domain, max_images=2, seed=0)[0])
    with pytest.raises(VisaeError, match="shares no class"):
        domain_sample(["cat", "dog"], domain, max_images=10, seed=0)

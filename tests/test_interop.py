"""`visae sae export|import`: SAELens folders and saev checkpoints, each checked with that library's
own code (sae_lens loads and runs the exports and writes the SAEs imported; saev 0.1.0 writes and
normalises the saev checkpoint) on real ViT activations: a random-init timm ViT on Fashion-MNIST."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from visae.cli import main
from visae.errors import VisaeError
from visae.sae import checkpoint as ckpt
from visae.sae import config as C
from visae.sae.modules import build_sae, estimate_normalisation

FASHION_MNIST_DEB = Path("/usr/share/datasets/fashion-mnist")
# sae-lens and saev live in a venv of their own layered over .venv (`make setup`, see the Makefile):
# their packages join this process's path last, so nothing they bring shadows visae's own pins.
for site in sorted((Path(__file__).resolve().parents[1] / ".venv-interop").glob("lib/python*/site-packages")):
    sys.path.append(str(site))
MODEL = {"source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 28, "init_seed": 7,
         "model_kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2}}
D, WIDTH, IMAGES = 32, 128, 40  # CLS + 7x7 patches per image: 2,000 tokens


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    if not (FASHION_MNIST_DEB / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is absent: apt-get install -y dataset-fashion-mnist")
    from visae.extract import plan_extract, run_extract

    spec = {"format": "fashion-mnist", "root": str(FASHION_MNIST_DEB), "split": "test"}
    plan = plan_extract(MODEL, spec, [1], tokens="all", batch_size=20, max_images=IMAGES)
    (path,) = run_extract(plan, tmp_path_factory.mktemp("interop_store"), progress=False, num_workers=0)
    return path


@pytest.fixture(scope="module")
def acts(store):
    from visae.store import ActivationStore

    return ActivationStore(store).take(range(IMAGES)).reshape(-1, D).float()


def visae_sae(arch: str, acts: torch.Tensor, **hparams):
    """An SAE of `arch` with every parameter away from its initial value: the data's normalisation,
    random biases and thresholds, BatchTopK's threshold from its own update on the data."""
    g = torch.Generator().manual_seed(len(arch) + len(hparams))
    sae = build_sae(arch, D, WIDTH, seed=3, init="tied", **hparams)
    mu, s = estimate_normalisation(acts)
    sae.set_normalisation(mu, s)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(WIDTH, generator=g) - 0.1)
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g))
        if arch == "jumprelu":
            sae.theta.copy_(0.5 * torch.rand(WIDTH, generator=g))
        if hasattr(sae, "threshold"):
            sae.train()
            xn = sae.normalise(acts[:512])
            for _ in range(3):
                sae.after_step(sae.train_loss(xn)[1], len(xn))
    sae.eval()
    return sae


def save_visae(sae, directory: Path, name: str) -> Path:
    ckpt.save(sae, directory, {"name": name, "complete": True, "entry": {"name": name, "architecture": sae.architecture},
                               "identity": {"model": "vit", "dataset": "fmnist", "layer": 1, "sae": name,
                                            "store_hash": "x"}})
    return directory


def one_line_error(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("visae: error: "), err
    assert message in err, err
    return err


ARCHS = [("relu", {}, "standard"), ("topk", {"k": 8}, "topk"), ("batchtopk", {"k": 8}, "jumprelu"),
         ("jumprelu", {}, "jumprelu"), ("matryoshka", {"k": 8, "inner": "topk"}, "topk"),
         ("matryoshka", {"k": 8, "inner": "batchtopk"}, "jumprelu")]


@pytest.mark.parametrize("arch, hparams, lens_arch", ARCHS)
def test_export_runs_in_saelens_with_the_same_codes_and_reconstructions(tmp_path, acts, arch, hparams, lens_arch):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (`make setup` puts it in .venv-interop)")
    sae = visae_sae(arch, acts, **hparams)
    assert main(["sae", "export", "--sae", str(save_visae(sae, tmp_path / "v", arch)), "--out", str(tmp_path / "l")]) == 0
    cfg = json.loads((tmp_path / "l" / "cfg.json").read_text())
    assert cfg["architecture"] == lens_arch and cfg["normalize_activations"] == "none"
    lens = sae_lens.SAE.load_from_disk(tmp_path / "l")
    with torch.no_grad():
        f, f_lens = sae.encode(acts), lens.encode(acts)
        assert 0 < (f > 0).sum(1).float().mean() < WIDTH / 2  # a sparse code, not all zeros
        assert torch.equal(f > 0, f_lens > 0)
        torch.testing.assert_close(f_lens, f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lens.decode(f), sae.decode(f), atol=1e-5, rtol=1e-5)

    # and back: the visae SAE itself (architecture, hyperparameters, normalisation), its outputs to rounding
    assert main(["sae", "import", "--format", "saelens", "--path", str(tmp_path / "l"), "--out", str(tmp_path / "b")]) == 0
    back = ckpt.load(tmp_path / "b")
    assert (back.architecture, back.hparams) == (sae.architecture, sae.hparams)
    assert torch.equal(back.mu, sae.mu) and torch.equal(back.scale, sae.scale)
    for name in ("W_enc", "W_dec", "b_dec", "b_enc"):  # the fold undone: equal to float32 rounding
        torch.testing.assert_close(getattr(back, name), getattr(sae, name), atol=1e-7, rtol=1e-6)
    with torch.no_grad():
        assert torch.equal(back.encode(acts) > 0, f > 0)
        torch.testing.assert_close(back.encode(acts), f, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(back.decode(f), sae.decode(f), atol=1e-6, rtol=1e-6)
    saved = ckpt.read_config(tmp_path / "v")
    assert (back.config["identity"], back.config["name"]) == (saved["identity"], saved["name"])
    assert back.config["entry"] == {**saved["entry"], "import": "saelens", "path": str(tmp_path / "l")}
    assert back.config["imported"]["format"] == "saelens" and back.config["imported"]["normalisation"] == {
        "method": "restored"}


def _saelens_sae(sae_lens, kind: str):
    """A SAELens inference SAE of `kind` with random weights of realistic scale."""
    g = torch.Generator().manual_seed(11)
    common = dict(d_in=D, d_sae=WIDTH, dtype="float32", device="cpu")
    if kind == "standard-no-bdec":
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common, apply_b_dec_to_input=False))
    elif kind == "topk-rescaled":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(**common, k=6, rescale_acts_by_decoder_norm=True))
    elif kind == "jumprelu":
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common))
    else:
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, WIDTH, generator=g) / D ** 0.5)
        sae.W_dec.copy_(torch.randn(WIDTH, D, generator=g) * (0.5 + torch.rand(WIDTH, 1, generator=g)))
        sae.b_enc.copy_(0.1 * torch.randn(WIDTH, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=g))
        if kind == "jumprelu":
            sae.threshold.copy_(0.4 * torch.rand(WIDTH, generator=g) - 0.1)  # some below 0: SAELens's ReLU wins
    return sae


@pytest.mark.parametrize("kind, arch", [("standard", "relu"), ("standard-no-bdec", "relu"),
                                        ("topk-rescaled", "topk"), ("jumprelu", "jumprelu")])
def test_saelens_saes_import_with_their_codes_and_reconstructions(tmp_path, store, acts, kind, arch):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (`make setup` puts it in .venv-interop)")
    lens = _saelens_sae(sae_lens, kind)
    lens.save_model(tmp_path / "l")
    argv = ["sae", "import", "--format", "saelens", "--path", str(tmp_path / "l"), "--out", str(tmp_path / "v"),
            "--store", str(store), "--name", "lens"]
    assert main(argv) == 0
    sae = ckpt.load(tmp_path / "v")
    assert sae.architecture == arch
    with torch.no_grad():
        f_lens, f = lens.encode(acts), sae.encode(acts)
        assert 0 < (f > 0).sum(1).float().mean() < WIDTH
        assert torch.equal(f > 0, f_lens > 0)
        torch.testing.assert_close(f, f_lens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(f_lens), lens.decode(f_lens), atol=1e-5, rtol=1e-5)
    cfg = sae.config
    weights = tmp_path / "l" / "sae_weights.safetensors"
    assert cfg["imported"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert cfg["identity"]["sae"] == "lens" and cfg["source"]["d_model"] == D and cfg["complete"] is True


def _saev_shards(root: Path, store) -> Path:
    """The store's layer as saev 0.1.0's activation shards (metadata.json + acts000000.bin)."""
    from visae.store import ActivationStore

    s = ActivationStore(store)
    acts = s.take(range(s.n_images)).float().numpy()  # [images, CLS + 49 patches, d]
    n_tokens = acts.shape[1]
    root.mkdir()
    meta = {"vit_family": "timm", "vit_ckpt": "random", "layers": [1], "n_patches_per_img": n_tokens - 1,
            "cls_token": True, "d_vit": D, "seed": 42, "n_imgs": s.n_images,
            "n_patches_per_shard": s.n_images * n_tokens, "data": "fashion-mnist"}
    (root / "metadata.json").write_text(json.dumps(meta))
    np.memmap(root / "acts000000.bin", mode="w+", dtype=np.float32, shape=(s.n_images, 1, n_tokens, D))[:] = \
        acts[:, None]
    return root


def test_a_saev_checkpoint_reproduces_saev(tmp_path, store):
    """saev 0.1.0 (the paper's format) trains a few steps on its own normalised patches and dumps;
    the import, normalising with saev's recipe on the store, gives saev's codes and reconstructions."""
    pytest.importorskip("saev.activations", reason="saev is not installed (`make setup` puts it in .venv-interop)")
    import saev.activations
    import saev.config
    import saev.nn

    data = saev.activations.Dataset(saev.config.DataLoad(shard_root=str(_saev_shards(tmp_path / "shards", store)),
                                                         patches="patches", layer=1))
    xn = torch.stack([data[i]["act"] for i in range(len(data))])  # saev's normalised patches, image by image
    torch.manual_seed(0)
    sae = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=D, exp_factor=4, sparsity_coeff=4e-3,
                                                                  n_reinit_samples=len(xn)))
    sae.init_b_dec(xn)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(10):
        opt.zero_grad()
        sae(xn)[2].loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_w_dec()
    saev.nn.dump(str(tmp_path / "sae.pt"), sae)

    argv = ["sae", "import", "--format", "saev", "--path", str(tmp_path / "sae.pt"), "--out", str(tmp_path / "v"),
            "--store", str(store), "--token-kind", "patches"]
    assert main(argv) == 0
    ours = ckpt.load(tmp_path / "v")
    raw = xn * data.scalar + data.act_mean  # the store's patches, as saev read them
    with torch.no_grad():
        x_hat, f, _ = saev.nn.load(str(tmp_path / "sae.pt"))(xn)
        assert 0 < (f > 0).sum(1).float().mean() < 4 * D
        torch.testing.assert_close(ours.normalise(raw), xn, atol=1e-5, rtol=1e-5)  # saev's constants, recomputed
        torch.testing.assert_close(ours.encode(raw), f, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.decode(f), x_hat * data.scalar + data.act_mean, atol=1e-5, rtol=1e-5)
    cfg = ours.config
    assert cfg["imported"]["sha256"] == hashlib.sha256((tmp_path / "sae.pt").read_bytes()).hexdigest()
    assert cfg["imported"]["normalisation"]["method"] == "saev" and cfg["entry"]["l1"] == 4e-3
    assert cfg["architecture"] == "relu" and cfg["source"]["token_kind"] == "patches"


def _saev_v5(path: Path, activation: dict, state: dict) -> Path:
    """A file as saev's current `nn.modeling.dump` writes it (schema 5: header line + torch.save)."""
    import io

    header = {"schema": 5, "cfg": {"d_model": D, "d_sae": WIDTH, "activation": activation}, "commit": "x", "lib": "1"}
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes((json.dumps(header) + "\n").encode() + buf.getvalue())
    return path


def _random_state(**extra) -> dict:
    g = torch.Generator().manual_seed(5)
    return {"W_enc": torch.randn(D, WIDTH, generator=g) / D ** 0.5, "b_enc": 0.1 * torch.randn(WIDTH, generator=g),
            "W_dec": torch.randn(WIDTH, D, generator=g), "b_dec": 0.2 * torch.randn(D, generator=g), **extra}


@pytest.mark.parametrize("cls, threshold", [("Relu", None), ("BatchTopK", 0.3), ("BatchTopK", -1.0)])
def test_saev_schema5_checkpoints_follow_its_encoder(tmp_path, acts, cls, threshold):
    """saev >= 0.2 (needs Python 3.12, not on PyPI): its encoder, as src/saev/nn/modeling.py has it,
    h = x W_enc + b_enc (no b_dec subtraction); Relu, or BatchTopK's inference rule
    `x if x > θ else 0` (a ReLU while θ <= 0); x̂ = f W_dec + b_dec, on raw activations."""
    extra = {} if threshold is None else {"activation.threshold": torch.tensor(threshold)}
    params = {"key": "relu"} if cls == "Relu" else {"key": "batch-top-k", "top_k": 8, "momentum": 0.1}
    path = _saev_v5(tmp_path / "sae.pt", {"cls": cls, "params": params}, _random_state(**extra))
    assert main(["sae", "import", "--format", "saev", "--path", str(path), "--out", str(tmp_path / "v")]) == 0
    sae = ckpt.load(tmp_path / "v")
    t = _random_state()
    h = acts @ t["W_enc"] + t["b_enc"]
    f = torch.relu(h) if threshold is None or threshold <= 0 else torch.where(h > threshold, h, torch.zeros_like(h))
    with torch.no_grad():
        assert sae.architecture == ("relu" if cls == "Relu" else "batchtopk")
        torch.testing.assert_close(sae.encode(acts), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(f), f @ t["W_dec"] + t["b_dec"], atol=1e-5, rtol=1e-5)
    assert sae.config["imported"]["normalisation"] == {"method": "none"}


def test_a_saev_checkpoint_with_given_constants(tmp_path, acts):
    """saev <= 0.1 with its `scale_mean` / `scale_norm` constants given (--mean, --scale)."""
    import io

    t = _random_state()
    buf = io.BytesIO()
    torch.save(t, buf)
    path = tmp_path / "legacy.pt"
    path.write_bytes(json.dumps({"d_vit": D, "exp_factor": 4, "sparsity_coeff": 4e-4}).encode() + b"\n" + buf.getvalue())
    mean = acts.mean(0)
    np.save(tmp_path / "mean.npy", mean.numpy())
    assert main(["sae", "import", "--format", "saev", "--path", str(path), "--out", str(tmp_path / "v"),
                 "--mean", str(tmp_path / "mean.npy"), "--scale", "0.75"]) == 0
    sae = ckpt.load(tmp_path / "v")
    f = torch.relu(((acts - mean) / 0.75 - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(acts), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(f), (f @ t["W_dec"] + t["b_dec"]) * 0.75 + mean, atol=1e-5, rtol=1e-5)
    assert sae.config["imported"]["normalisation"] == {"method": "given", "mean": str(tmp_path / "mean.npy"),
                                                       "scale": 0.75}


def test_unrepresentable_sources_are_refused_with_one_line_and_nothing_written(tmp_path, capsys, acts):
    out = tmp_path / "out"
    v5 = _saev_v5(tmp_path / "topk.pt", {"cls": "TopK", "params": {"top_k": 8}}, _random_state())
    one_line_error(capsys, ["sae", "import", "--format", "saev", "--path", str(v5), "--out", str(out)],
                   "saev's TopK keeps negative pre-activations among the top k (no ReLU)")
    v5 = _saev_v5(tmp_path / "btk.pt", {"cls": "BatchTopK", "params": {"top_k": 8}}, _random_state())
    one_line_error(capsys, ["sae", "import", "--format", "saev", "--path", str(v5), "--out", str(out)],
                   "has no inference threshold")
    v1 = tmp_path / "v1.pt"
    v1.write_bytes(b'{"schema": 1, "cfg": {}}\n' + v5.read_bytes().partition(b"\n")[2])
    one_line_error(capsys, ["sae", "import", "--format", "saev", "--path", str(v1), "--out", str(out)],
                   "saev schema 1 is ambiguous")
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b'{"d_vit": 32, "exp_factor": 4}\n' + v5.read_bytes().partition(b"\n")[2])
    one_line_error(capsys, ["sae", "import", "--format", "saev", "--path", str(legacy), "--out", str(out)],
                   "saev <= 0.1 checkpoints expect activations normalised by saev's data loader")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02 not a header\n")
    one_line_error(capsys, ["sae", "import", "--format", "saev", "--path", str(tmp_path / "junk.pt"), "--out", str(out)],
                   "is not a saev checkpoint (its first line is not a JSON header)")
    fresh = build_sae("batchtopk", D, WIDTH, seed=0, k=8)  # never trained: no threshold to export
    one_line_error(capsys, ["sae", "export", "--sae", str(save_visae(fresh, tmp_path / "fresh", "b")), "--out", str(out)],
                   "has no inference threshold yet")
    lens = tmp_path / "lens"
    lens.mkdir()
    (lens / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": D, "d_sae": WIDTH,
                                               "metadata": {"sae_lens_version": "6.54.12"}}))
    (lens / "sae_weights.safetensors").write_bytes(b"x")
    one_line_error(capsys, ["sae", "import", "--format", "saelens", "--path", str(lens), "--out", str(out)],
                   "SAELens architecture 'gated' has no visae equivalent")
    (lens / "cfg.json").write_text(json.dumps({"architecture": "standard", "normalize_activations": "layer_norm",
                                               "metadata": {"sae_lens_version": "6.54.12"}}))
    one_line_error(capsys, ["sae", "import", "--format", "saelens", "--path", str(lens), "--out", str(out)],
                   "normalize_activations 'layer_norm' rescales each token at run time")
    one_line_error(capsys, ["sae", "import", "--format", "saelens", "--path", str(lens), "--out", str(out),
                            "--normalisation", "saev"], "a SAELens SAE takes raw activations")
    assert not out.exists() or not any(out.iterdir())


def test_the_import_checks_the_store_and_the_checksum(tmp_path, capsys, store):
    path = _saev_v5(tmp_path / "sae.pt", {"cls": "Relu", "params": {}},
                    {k: v[:16] if k in ("W_enc", "b_dec") else v[:, :16] if k == "W_dec" else v
                     for k, v in _random_state().items()})
    base = ["sae", "import", "--format", "saev", "--path", str(path), "--out", str(tmp_path / "v"),
            "--marker", str(tmp_path / "provenance.json")]
    one_line_error(capsys, base + ["--store", str(store)],
                   f"is an SAE of d_model 16 but store {store} has d_model 32")
    one_line_error(capsys, base + ["--sha256", "0" * 64], f"not the {'0' * 64} the entry expects")
    assert not (tmp_path / "v").exists() and not (tmp_path / "provenance.json").exists()


def test_an_imported_sae_evaluates_like_a_trained_one(tmp_path, store):
    """What the workflow's train rule runs for an `import:` entry: the checkpoint and the pass marker
    `visae train` writes; `visae evaluate` takes it as it is."""
    path = _saev_v5(tmp_path / "paper.pt", {"cls": "Relu", "params": {}}, _random_state())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    run = tmp_path / "saes" / "paper"
    assert main(["sae", "import", "--format", "saev", "--path", str(path), "--out", str(run / "paper"),
                 "--name", "paper", "--sha256", sha, "--store", str(store), "--marker", str(run / "provenance.json"),
                 "--heldout", "0.25", "--split-seed", "3"]) == 0
    marker = json.loads((run / "provenance.json").read_text())
    assert marker["config"]["source_sha256"] == {"paper.pt": sha} and marker["config"]["import"]["sha256"] == sha
    assert main(["evaluate", "--store", str(store), "--sae", str(run / "paper"), "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["identity"]["sae"] == "paper" and metrics["architecture"] == "relu"
    assert metrics["entry"]["import"] == "saev" and metrics["heldout_images"] == 10  # a quarter of 40, seed 3


def test_grid_entries_that_import():
    entry = {"name": "paper-clip", "import": "saev", "path": "/x/sae.pt"}
    assert C.validate_grid([entry], 64, allow_import=True) == [entry]
    with pytest.raises(VisaeError, match="^grid entry 'paper-clip': it is imported \\(import: saev\\), not trained"):
        C.validate_grid([entry], 64)  # what `visae train` says
    for change, message in [({"k": 4}, "unknown key 'k' for an imported SAE"),
                            ({"architecture": "relu"}, "takes its architecture from its source"),
                            ({"import": "sparsify"}, "key 'import' is 'sparsify'; allowed: saev, saelens"),
                            ({"sha256": "abc"}, "key 'sha256' must be 64 lowercase hex digits"),
                            ({"path": {"clip": ""}}, "key 'path' must be a file or folder, or a mapping"),
                            ({"sha256": {"clip": "0" * 64}}, "key 'sha256' must have the shape of 'path'")]:
        with pytest.raises(VisaeError, match=message):
            C.validate_grid([{**entry, **change}], 64, allow_import=True)
    trained = {"name": "t", "architecture": "topk", "k": 4, "batch_size": 64}
    assert [e["name"] for e in C.validate_grid([trained, entry], 16, allow_import=True)] == ["t", "paper-clip"]
    per_model = {**entry, "path": {"clip": "/c.pt", "dino": "/d.pt"}, "sha256": {"clip": "a" * 64}}
    assert C.validate_grid([per_model], 64, allow_import=True) == [per_model]
    props = C.schema_import_properties()
    assert props["import"] == {"enum": ["saev", "saelens"], "description": props["import"]["description"]}
    assert set(props) == {"import", "path", "sha256"} and props["path"]["type"] == ["string", "object"]
    assert props["sha256"]["additionalProperties"] == {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    import jsonschema

    entry_schema = {"type": "object", "required": ["import", "path"], "additionalProperties": False,
                    "properties": {"pass": {"type": "string"}, **props}}
    jsonschema.validate({k: v for k, v in per_model.items() if k != "name"}, entry_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"import": "saev", "path": "/x", "sha256": "xyz"}, entry_schema)


def test_the_workflow_gives_each_pass_to_one_rule():
    """train.smk's two rules split the pass names with these constraints (a marker's path goes
    <...>/<pass>/provenance.json); the import rule reads the model's file and passes its checksum."""
    import re

    marker = "results/saes/m/d/layer_1/{}/provenance.json"
    imported = ["paper", "b.2"]
    trained = re.compile(rf"results/saes/m/d/layer_1/(?P<p>{C.pass_pattern(imported, trained=True)})/provenance\.json")
    importer = re.compile(rf"results/saes/m/d/layer_1/(?P<p>{C.pass_pattern(imported, trained=False)})/provenance\.json")
    for name in ("paper", "b.2", "paper2", "bx2", "relu", "topk-16.seed1"):
        path = marker.format(name)
        assert bool(trained.fullmatch(path)) != bool(importer.fullmatch(path)), name
        assert bool(importer.fullmatch(path)) == (name in imported), name
    assert C.pass_pattern([], trained=True) == "[^/]+" and not re.fullmatch(C.pass_pattern([], trained=False), "x")
    entry = {"import": "saelens", "path": {"clip": "/s/my sae", "dino": "/s/d"}, "sha256": {"clip": "a" * 64}}
    assert C.import_files(entry, "clip") == ["/s/my sae/cfg.json", "/s/my sae/sae_weights.safetensors"]
    assert C.import_flags("paper", entry, "clip") == f"--format saelens --path '/s/my sae' --name paper --sha256 {'a' * 64}"
    assert C.import_flags("paper", entry, "dino") == "--format saelens --path /s/d --name paper"

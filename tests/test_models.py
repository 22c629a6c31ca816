"""Backbone registry and residual-stream recording, on the real open_clip/timm architectures.

No pretrained weights can be downloaded here, so models are randomly initialised; what is checked
is that `record` returns exactly the model's own intermediate outputs, in the documented token
order, and that every user-fixable failure is one clear line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visae.errors import VisaeError
from visae.models import Backbone, TokenLayout, load_backbone, parse_model_arg

torch.set_num_threads(min(2, os.cpu_count() or 1))
ATOL = 1e-5


def _spec(source, arch, **kw):
    return {"source": source, "arch": arch, "pretrained": None, "weights": None, **kw}


def _load(spec, seed=0) -> Backbone:
    torch.manual_seed(seed)
    return load_backbone(spec)


@pytest.fixture(scope="module")
def clip16() -> Backbone:
    return _load(_spec("open_clip", "ViT-B-16"))


@pytest.fixture(scope="module")
def dino_reg() -> Backbone:
    return _load(_spec("timm", "vit_base_patch14_reg4_dinov2.lvd142m", image_size=224))


@pytest.fixture(scope="module")
def dino_small() -> Backbone:
    return _load(_spec("timm", "vit_small_patch14_dinov2.lvd142m", image_size=224))


def _pixels(bb: Backbone, paths: list[Path]) -> torch.Tensor:
    return torch.stack([bb.transform(Image.open(p).convert("RGB")) for p in paths])


def _imagenet(d: Path, n=2) -> list[Path]:
    return sorted(d.glob("*.JPEG"))[:n]


def _cifar(d: Path, n=2) -> list[Path]:
    return [sorted((d / c).glob("*.jpg"))[0] for c in sorted(os.listdir(d))[:n]]


# --------------------------------------------------------------------------- open_clip CLIP

def test_clip_layout(clip16):
    assert clip16.layout == TokenLayout(n_cls=1, n_registers=0, grid=(14, 14))
    assert (clip16.layout.n_prefix, clip16.layout.n_patches, clip16.layout.n_tokens) == (1, 196, 197)
    assert (clip16.d_model, clip16.n_layers) == (768, 12)
    assert clip16.image_size == (224, 224) and clip16.patch_size == (16, 16)
    assert clip16.layout.to_dict() == {"n_cls": 1, "n_registers": 0, "grid": [14, 14], "n_prefix": 1,
                                       "n_patches": 196, "n_tokens": 197}
    assert TokenLayout.from_dict(clip16.layout.to_dict()) == clip16.layout
    assert not hasattr(clip16.model, "token_embedding")  # the text tower is dropped
    assert not clip16.model.training


def test_clip_record_equals_open_clip_intermediates(clip16, imagenet_sample_dir):
    px = _pixels(clip16, _imagenet(imagenet_sample_dir))
    assert px.shape == (2, 3, 224, 224)
    out = clip16.record(px, [3, -1])
    assert sorted(out) == [3, 11]
    with torch.inference_mode():
        ref = clip16.model.forward_intermediates(
            px, indices=[3, 11], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
    for i, layer in enumerate([3, 11]):
        want = torch.cat([ref["image_intermediates_prefix"][i], ref["image_intermediates"][i]], dim=1)
        assert out[layer].shape == (2, 197, 768)
        torch.testing.assert_close(out[layer], want, atol=ATOL, rtol=ATOL)
    # a negative layer is the same block counted from the end
    torch.testing.assert_close(clip16.record(px, [-9])[3], out[3], atol=0, rtol=0)
    # images differ, so their activations do
    assert not torch.allclose(out[11][0], out[11][1])


def test_layer_out_of_range_is_one_line(clip16):
    with pytest.raises(VisaeError) as err:
        clip16.resolve_layer(12)
    assert str(err.value) == "layer 12 is out of range for ViT-B-16 (12 blocks): use 0..11 or -12..-1"
    with pytest.raises(VisaeError, match="layer -13 is out of range"):
        clip16.record(torch.zeros(1, 3, 224, 224), [-13])
    assert clip16.resolve_layer(-1) == 11 and clip16.resolve_layer(0) == 0


def test_record_stops_after_deepest_block(clip16, cifar10_dir):
    calls = {4: 0, 5: 0, 11: 0}
    handles = [clip16._blocks[i].register_forward_hook(
        lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]
    try:
        out = clip16.record(_pixels(clip16, _cifar(cifar10_dir, 1)), [4, 1])
    finally:
        for h in handles:
            h.remove()
    assert sorted(out) == [1, 4]
    assert calls == {4: 1, 5: 0, 11: 0}


# --------------------------------------------------------------------------- timm DINOv2

@pytest.mark.parametrize("which, layout, d_model", [
    ("dino_reg", TokenLayout(1, 4, (16, 16)), 768),
    ("dino_small", TokenLayout(1, 0, (16, 16)), 384),
])
def test_dinov2_record_equals_timm_intermediates(which, layout, d_model, request, cifar10_dir):
    bb: Backbone = request.getfixturevalue(which)
    assert bb.layout == layout and bb.d_model == d_model and bb.n_layers == 12
    assert bb.image_size == (224, 224) and bb.patch_size == (14, 14)
    px = _pixels(bb, _cifar(cifar10_dir, 2))
    assert px.shape == (2, 3, 224, 224)  # image_size honoured by the data config, not 518
    out = bb.record(px, [-8, 1])
    assert sorted(out) == [1, 4]
    with torch.inference_mode():
        ref = bb.model.forward_intermediates(
            px, indices=[1, 4], norm=False, output_fmt="NLC", return_prefix_tokens=True,
            intermediates_only=True, stop_early=True,
        )
    for (patches, prefix), layer in zip(ref, [1, 4]):
        assert prefix.shape[1] == layout.n_prefix
        want = torch.cat([prefix, patches], dim=1)
        assert out[layer].shape == (2, layout.n_tokens, d_model)
        torch.testing.assert_close(out[layer], want, atol=ATOL, rtol=ATOL)


def test_siglip_has_no_cls_token(imagenet_sample_dir):
    bb = _load(_spec("open_clip", "ViT-B-16-SigLIP"))
    assert bb.layout == TokenLayout(0, 0, (14, 14)) and bb.layout.n_tokens == 196
    assert (bb.d_model, bb.n_layers) == (768, 12)
    # SigLIP's own preprocessing (mean/std 0.5, squash resize), not CLIP's defaults
    norm = bb.transform.transforms[-1]
    assert tuple(norm.mean) == (0.5, 0.5, 0.5)
    px = _pixels(bb, _imagenet(imagenet_sample_dir, 1))
    out = bb.record(px, [2])
    with torch.inference_mode():
        (ref,) = bb.model.trunk.forward_intermediates(px, indices=[2], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(out[2], ref, atol=ATOL, rtol=ATOL)
    assert bb.mask_transform(np.zeros((375, 500), dtype=np.uint8)).shape == (224, 224)


# --------------------------------------------------------------------------- weights

def test_local_weights_reproduce_outputs(tmp_path, dino_small, clip16, cifar10_dir):
    from safetensors.torch import save_file

    for bb, spec in [
        (dino_small, _spec("timm", "vit_small_patch14_dinov2.lvd142m", image_size=224)),
        (clip16, _spec("open_clip", "ViT-B-16")),  # a visual-tower-only state dict
    ]:
        path = tmp_path / f"{bb.name}.safetensors"
        save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
        loaded = _load({**spec, "weights": str(path)}, seed=123)  # a different random init first
        assert loaded.weights == str(path)
        px = _pixels(bb, _cifar(cifar10_dir, 1))
        torch.testing.assert_close(loaded.record(px, [2])[2], bb.record(px, [2])[2], atol=0, rtol=0)
        path.unlink()


def test_full_open_clip_checkpoint_and_pretrain_source(tmp_path, cifar10_dir):
    import open_clip

    torch.manual_seed(1)
    clip = open_clip.create_model("ViT-S-32", pretrained=None, force_image_size=160)  # text tower included
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    bb = load_backbone({**_spec("open_clip", "ViT-S-32", image_size=160), "weights": str(path)})
    assert bb.layout == TokenLayout(1, 0, (5, 5)) and bb.image_size == (160, 160)
    px = _pixels(bb, _cifar(cifar10_dir, 1))
    assert px.shape == (1, 3, 160, 160)
    torch.testing.assert_close(bb.record(px, [2])[2],
                               torch.cat(_oc_intermediates(clip.visual, px, 2), dim=1), atol=ATOL, rtol=ATOL)

    # `pretrain`: a timm ViT visae trained itself; weights are required
    with pytest.raises(VisaeError, match="source pretrain needs weights"):
        load_backbone(_spec("pretrain", "vit_tiny_patch16_224"))
    kw = {"img_size": 32, "patch_size": 4, "num_classes": 10}
    tiny = _load({**_spec("timm", "vit_tiny_patch16_224"), "model_kwargs": kw})
    pth = tmp_path / "tiny.pth"
    torch.save({"state_dict": tiny.model.state_dict()}, pth)
    mine = load_backbone({**_spec("pretrain", "vit_tiny_patch16_224"), "model_kwargs": kw, "weights": str(pth)})
    assert mine.layout == TokenLayout(1, 0, (8, 8)) and mine.image_size == (32, 32)
    px = _pixels(mine, _cifar(cifar10_dir, 2))
    torch.testing.assert_close(mine.record(px, [-1])[11], tiny.record(px, [-1])[11], atol=0, rtol=0)
    assert mine.source == "pretrain" and mine.weights == str(pth)


def _oc_intermediates(visual, px, layer):
    with torch.inference_mode():
        ref = visual.forward_intermediates(px, indices=[layer], output_fmt="NLC", output_extra_tokens=True,
                                           intermediates_only=True)
    return ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]


def test_missing_and_wrong_weights_are_one_line(tmp_path, dino_small):
    from safetensors.torch import save_file

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(VisaeError, match=f"weights file {missing} does not exist"):
        load_backbone({**_spec("timm", "vit_small_patch14_dinov2"), "weights": str(missing)})

    small = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in dino_small.model.state_dict().items()}, str(small))
    for spec, why in (
        (_spec("timm", "vit_base_patch14_dinov2", image_size=224),
         "174 shape mismatch(es), e.g. cls_token: file [1, 1, 384] vs model [1, 1, 768]"),
        (_spec("open_clip", "ViT-B-32"), "missing key(s), e.g. class_embedding; 174 unexpected key(s)"),
    ):
        with pytest.raises(VisaeError) as err:
            load_backbone({**spec, "weights": str(small)})
        msg = str(err.value)
        assert msg.startswith(f"weights file {small} does not fit {spec['source']} ")
        assert why in msg and "\n" not in msg and len(msg) < 300

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(VisaeError, match="cannot read weights file"):
        load_backbone({**_spec("timm", "vit_small_patch14_dinov2"), "weights": str(junk)})


def test_hub_tag_offline_says_how_to_give_a_file(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent/visae-test-cache")
    t0 = time.perf_counter()
    with pytest.raises(VisaeError) as err:
        load_backbone({**_spec("open_clip", "ViT-B-16"), "pretrained": "openai"})
    assert str(err.value) == (
        "cannot download weights 'openai' for open_clip ViT-B-16 (no network?): download them where a "
        "network is available and set weights: /path/to/file in the model's config entry (CLI: --weights PATH)"
    )
    with pytest.raises(VisaeError, match=r"^cannot download weights 'lvd142m' for timm "
                                         r"vit_small_patch14_dinov2\.lvd142m \(no network\?\)"):
        load_backbone(parse_model_arg("timm:vit_small_patch14_dinov2.lvd142m"))
    assert time.perf_counter() - t0 < 20


def test_unknown_names_list_what_is_allowed():
    with pytest.raises(VisaeError, match="unknown timm architecture 'vit_bse_patch14_dinov2'; close matches: "
                                         ".*vit_base_patch14_dinov2"):
        load_backbone(_spec("timm", "vit_bse_patch14_dinov2"))
    with pytest.raises(VisaeError, match="unknown open_clip architecture 'ViT-B-61'; close matches: .*ViT-B-16"):
        load_backbone(_spec("open_clip", "ViT-B-61"))
    with pytest.raises(VisaeError, match="unknown model source 'hf': use one of open_clip, timm, pretrain"):
        load_backbone(_spec("hf", "ViT-B-16"))
    with pytest.raises(VisaeError, match="unknown pretrained tag 'opneai' for open_clip ViT-B-16: known tags are "
                                         ".*openai"):
        load_backbone({**_spec("open_clip", "ViT-B-16"), "pretrained": "opneai"})
    with pytest.raises(VisaeError, match="not a plain ViT"):
        load_backbone(_spec("timm", "resnet18"))


def test_parse_model_arg():
    assert parse_model_arg("open_clip:ViT-B-16") == {
        "source": "open_clip", "arch": "ViT-B-16", "pretrained": None, "weights": None, "name": None,
        "image_size": None}
    assert parse_model_arg("open_clip:ViT-B-16@openai")["pretrained"] == "openai"
    s = parse_model_arg("timm:vit_base_patch14_reg4_dinov2.lvd142m")
    assert (s["source"], s["arch"], s["pretrained"]) == ("timm", "vit_base_patch14_reg4_dinov2.lvd142m", "lvd142m")
    assert parse_model_arg("timm:vit_small_patch14_dinov2")["pretrained"] is None
    for bad in ("ViT-B-16", "torchhub:x", "timm:"):
        with pytest.raises(VisaeError):
            parse_model_arg(bad)


# --------------------------------------------------------------------------- masks

@pytest.fixture(scope="module")
def vit_crop09() -> Backbone:
    """A timm ViT whose eval transform resizes to 248 and centre-crops 224 (crop_pct 0.9)."""
    return _load(_spec("timm", "vit_small_patch16_224.augreg_in21k_ft_in1k"))


@pytest.mark.parametrize("which", ["clip16", "dino_reg", "vit_crop09", "dino_paper"])
def test_mask_transform_follows_image_geometry(which, request, camvid_dir):
    bb: Backbone = request.getfixturevalue(which)
    name = sorted((camvid_dir / "valannot").glob("*.png"))[0].name
    labels = np.asarray(Image.open(camvid_dir / "valannot" / name)).astype(np.int64)  # 360 x 480, 0..11
    h, w = labels.shape

    got = bb.mask_transform(labels)
    assert got.shape == bb.image_size and got.dtype == np.int64
    assert set(np.unique(got)) <= set(np.unique(labels))  # nearest: no blended labels

    # 1) an image painted from the mask, sent through the model's own image transform, agrees
    palette = np.random.default_rng(0).integers(0, 256, size=(12, 3)).astype(np.uint8)
    painted = bb.transform(Image.fromarray(palette[labels]))
    norm = bb.transform.transforms[-1]
    rgb = painted * torch.as_tensor(norm.std).view(3, 1, 1) + torch.as_tensor(norm.mean).view(3, 1, 1)
    dist = ((rgb.permute(1, 2, 0).numpy()[:, :, None, :] * 255 - palette[None, None].astype(np.float32)) ** 2).sum(-1)
    assert (dist.argmin(-1) == got).mean() > 0.95

    # 2) every output pixel samples the source pixel the resize+centre-crop maps it to
    coords = np.arange(h * w, dtype=np.int64).reshape(h, w)
    src = bb.mask_transform(coords)
    rows, cols = src // w, src % w
    assert (np.diff(rows, axis=0) >= 0).all() and (np.diff(cols, axis=1) >= 0).all()
    short = {"vit_crop09": 248, "dino_paper": 256}.get(which, 224)
    rh, rw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)  # torchvision Resize(int)
    top, left = round((rh - 224) / 2), round((rw - 224) / 2)
    ii, jj = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    assert np.abs(rows - (ii + top + 0.5) / rh * h).max() <= 1.0
    assert np.abs(cols - (jj + left + 0.5) / rw * w).max() <= 1.0


def test_mask_transform_rejects_bad_masks(clip16):
    with pytest.raises(VisaeError, match="must be 2-D"):
        clip16.mask_transform(np.zeros((2, 3, 4), dtype=np.int64))
    with pytest.raises(VisaeError, match="must hold integers"):
        clip16.mask_transform(np.zeros((20, 30), dtype=np.float32))
    out = clip16.mask_transform(np.full((30, 20), -1, dtype=np.int16))  # ignore labels survive
    assert out.shape == (224, 224) and (out == -1).all()


# --------------------------------------------------------------------------- CLI

def test_cli_models_show(capsys, tmp_path, dino_small):
    import json

    from visae.cli import main

    assert main(["models", "show", "timm:vit_small_patch14_dinov2", "--image-size", "224"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layout"] == dino_small.layout.to_dict()
    assert (shown["source"], shown["d_model"], shown["n_layers"], shown["patch_size"]) == ("timm", 384, 12, [14, 14])
    assert main(["models", "show", "timm:vit_small_patch14_dinov2", "--weights", str(tmp_path / "x.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- fidelity to the weights

@pytest.fixture(scope="module")
def clip16_weights(tmp_path_factory, clip16) -> Path:
    """A ViT-B-16 visual-tower state dict (random init, fp16 to keep the file small)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("clip") / "ViT-B-16.safetensors"
    save_file({k: v.half().contiguous() for k, v in clip16.model.state_dict().items()}, str(path))
    return path


def _mlp_act(bb: Backbone) -> str:
    return type(bb.model.transformer.resblocks[0].mlp.gelu).__name__


def test_clip_builds_the_activation_its_weights_were_trained_with(clip16, clip16_weights, monkeypatch, tmp_path,
                                                                  imagenet_sample_dir):
    """OpenAI's CLIP was trained with QuickGELU; open_clip's ViT-B-16 config builds GELU."""
    import hashlib
    import json

    import open_clip.factory
    from huggingface_hub import constants
    from safetensors.torch import load_file

    from visae.extract import plan_extract, run_extract

    assert _mlp_act(clip16) == "GELU" and clip16.activation == "GELU"  # no tag: the config's GELU
    # config/paper.yaml's entry: the openai tag and a local weights file
    openai = load_backbone({**_paper_model("clip-b16"), "weights": str(clip16_weights)})
    laion = load_backbone({**_spec("open_clip", "ViT-B-16"), "pretrained": "laion2b_s34b_b88k",
                           "weights": str(clip16_weights)})
    assert _mlp_act(openai) == "QuickGELU" and openai.activation == "QuickGELU"
    assert all(type(b.mlp.gelu).__name__ == "QuickGELU" for b in openai.model.transformer.resblocks)
    assert _mlp_act(laion) == "GELU" and laion.activation == "GELU"
    # the same weights through the two activations give other numbers: the choice matters
    px = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(openai.record(px, [3])[3], laion.record(px, [3])[3], atol=1e-3)
    sha = hashlib.sha256(clip16_weights.read_bytes()).hexdigest()
    assert openai.identity == {
        "source": "open_clip", "arch": "ViT-B-16", "pretrained": "openai", "weights_sha256": sha,
        "init_seed": None, "model_kwargs": {}, "image_size": [224, 224], "activation": "QuickGELU",
        "transform": " ".join(repr(openai.transform).split())}
    assert openai.to_dict()["activation"] == "QuickGELU" and openai.to_dict()["identity"] == openai.identity
    # and a store says so
    plan = plan_extract({}, {"format": "imagenet-sample", "root": str(imagenet_sample_dir)}, [0], max_images=1,
                        backbone=openai)
    (store,) = run_extract(plan, tmp_path / "store", progress=False, num_workers=0)
    model = json.loads((store / "meta.json").read_text())["model"]
    assert model["activation"] == "QuickGELU" and model["identity"] == openai.identity

    # the hub path: open_clip "downloads" the tag's weights (here: our file) and builds the model
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: str(clip16_weights))
    monkeypatch.setattr(open_clip.factory, "load_checkpoint",
                        lambda model, path, **kw: model.visual.load_state_dict(load_file(path)))
    hub = load_backbone({**_spec("open_clip", "ViT-B-16"), "pretrained": "openai"})
    assert _mlp_act(hub) == "QuickGELU" and hub.identity["activation"] == "QuickGELU"
    assert hub.identity["init_seed"] is None and hub.identity["weights_sha256"] is None
    torch.testing.assert_close(hub.record(px, [3])[3], openai.record(px, [3])[3], atol=0, rtol=0)


def _paper_model(name: str) -> dict:
    import yaml

    entry = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "paper.yaml").read_text())["models"][name]
    return {k: v for k, v in entry.items() if k not in ("weights", "layers")}  # no weights here: random init


@pytest.fixture(scope="module")
def dino_paper() -> Backbone:
    """DINOv2 as config/paper.yaml builds it (the paper's Resize(256) + CenterCrop(224))."""
    return _load(_paper_model("dinov2-b14-reg"))


def test_dinov2_paper_transform_is_saevs(dino_paper, dino_reg, imagenet_sample_dir):
    from torchvision.transforms import v2

    steps = dino_paper.transform.transforms
    assert (steps[0].size, steps[1].size) == (256, (224, 224)) and dino_paper.image_size == (224, 224)
    assert (dino_reg.transform.transforms[0].size, dino_reg.transform.transforms[1].size) == (224, (224, 224))
    # saev 2284f52's DINOv2 transform (activations.make_img_transform), pixel for pixel
    saev = v2.Compose([v2.Resize(size=256), v2.CenterCrop(size=(224, 224)), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=[0.4850, 0.4560, 0.4060], std=[0.2290, 0.2240, 0.2250])])
    for path in _imagenet(imagenet_sample_dir, 2):
        img = Image.open(path).convert("RGB")
        torch.testing.assert_close(dino_paper.transform(img), saev(img), atol=1e-6, rtol=0)
    assert dino_paper.identity["transform"] != dino_reg.identity["transform"]
    squash = _load(_spec("timm", "vit_small_patch14_dinov2", image_size=224, crop_pct=0.875, crop_mode="squash"))
    assert squash.transform.transforms[0].size == (256, 256)
    for spec, msg in (
        (_spec("timm", "vit_small_patch14_dinov2", crop_pct=1.5), r"^crop_pct must be a number in \(0, 1\]"),
        (_spec("timm", "vit_small_patch14_dinov2", crop_mode="crop"),
         "^crop_mode must be one of center, squash, border"),
        (_spec("timm", "vit_small_patch14_dinov2", interpolation="lanczos"), "^interpolation must be one of bilinear"),
        (_spec("open_clip", "ViT-B-16", crop_pct=0.875), "^crop_pct and crop_mode are only supported for timm"),
    ):
        with pytest.raises(VisaeError, match=msg):
            load_backbone(spec)

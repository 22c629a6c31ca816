"""The dataset registry on real images: CIFAR-10, CamVid, imagenet-sample, Fashion-MNIST.

Layouts we have no real copy of (ADE20K, CUB-200-2011, a saved HF dataset, ImageNet folders)
are built in tmp_path from a few real images, so the parsing of each official layout is tested
on real pixels.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visae.data import (
    FORMATS,
    ImageDataset,
    Sample,
    fetch_fashion_mnist,
    open_dataset,
    parse_dataset_arg,
    patch_labels,
)
from visae.data import cli as data_cli
from visae.data.fashion_mnist import FILES, verify_file
from visae.errors import VisaeError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="visae")
    data_cli.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# --- ImageFolder on CIFAR-10 -----------------------------------------------------------------


def test_imagefolder_cifar10(cifar10_dir):
    ds = open_dataset({"format": "imagefolder", "root": str(cifar10_dir)})
    assert isinstance(ds, ImageDataset)
    assert ds.classes == CIFAR_CLASSES
    assert len(ds) == 10_000 and not ds.has_masks and ds.ignore_index is None
    labels = ds.label_array()
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    # each label is the index of the file's folder, and the order is sorted
    folders = [Path(p).parent.name for p, _ in ds.samples]
    assert [CIFAR_CLASSES[t] for t in labels] == folders
    assert [p for p, _ in ds.samples] == sorted(p for p, _ in ds.samples)
    for i in (0, 4321, len(ds) - 1, -1):
        s = ds[i]
        assert isinstance(s, Sample)
        assert s.image.mode == "RGB" and s.image.size == (32, 32)
        assert s.label == labels[i] and s.mask is None
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_imagefolder_split_subfolder(tmp_path, cifar10_dir):
    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for f in sorted((cifar10_dir / cls).iterdir())[:2]:
            shutil.copy(f, tmp_path / "val" / cls / f.name)
    ds = open_dataset({"format": "imagefolder", "root": str(tmp_path), "split": "val"})
    assert ds.classes == ["cat", "dog"] and ds.label_array().tolist() == [0, 0, 1, 1]
    with pytest.raises(VisaeError, match=r"split 'train' not found .*available: val"):
        open_dataset({"format": "imagefolder", "root": str(tmp_path), "split": "train"})


# --- CamVid and patch labels -------------------------------------------------------------------


def test_camvid_real(camvid_dir):
    ds = open_dataset(parse_dataset_arg(f"camvid:{camvid_dir}"))
    assert len(ds) == 101 and ds.has_masks and ds.ignore_index == 11
    assert len(ds.classes) == 11 and ds.spec["split"] == "val"
    assert (ds.label_array() == -1).all()
    names = [img.name for img, _ in ds.pairs]
    assert names == sorted(names) and names[0] == "0016E5_07959.png"
    s = ds[0]
    assert s.image.mode == "RGB" and s.image.size == (480, 360) and s.label == -1
    assert s.mask.dtype == np.int64 and s.mask.shape == (360, 480)
    values, counts = np.unique(s.mask, return_counts=True)
    assert values.tolist() == list(range(12))  # all 11 classes and the void label
    assert counts[-1] == 679  # void pixels in this frame
    # the same via the segfolder format with an explicit layout
    ds2 = open_dataset({"format": "segfolder", "layout": "camvid", "root": str(camvid_dir)})
    assert np.array_equal(ds2[0].mask, s.mask)


def test_camvid_without_listing_and_missing_annotation(tmp_path, camvid_dir):
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    ids = sorted(p.name for p in (camvid_dir / "val").iterdir())[:3]
    for name in ids:
        shutil.copy(camvid_dir / "val" / name, tmp_path / "val" / name)
        shutil.copy(camvid_dir / "valannot" / name, tmp_path / "valannot" / name)
    ds = open_dataset({"format": "camvid", "root": str(tmp_path)})
    assert [p.name for p, _ in ds.pairs] == ids
    assert ds[2].mask.shape == (360, 480)
    (tmp_path / "valannot" / ids[1]).unlink()
    with pytest.raises(VisaeError, match=f"missing annotation for image .*{ids[1]}"):
        open_dataset({"format": "camvid", "root": str(tmp_path)})
    with pytest.raises(VisaeError, match=r"split 'train' not found"):
        open_dataset({"format": "camvid", "root": str(tmp_path), "split": "train"})


def test_patch_labels_hand_built():
    ign = 255
    m = np.zeros((4, 6), dtype=np.int64)  # grid 2x3 of 2x2 patches
    m[0:2, 0:2] = [[1, 1], [1, 2]]  # patch 0: majority 1
    m[0:2, 2:4] = [[3, 2], [2, 3]]  # patch 1: tie 2/3 -> smallest, 2
    m[0:2, 4:6] = ign  # patch 2: all ignore -> ignore
    m[2:4, 0:2] = [[ign, ign], [ign, 7]]  # patch 3: only one non-ignore pixel -> 7
    m[2:4, 2:4] = [[5, ign], [ign, 4]]  # patch 4: tie 4/5 after dropping ignore -> 4
    m[2:4, 4:6] = [[0, 0], [9, 9]]  # patch 5: tie 0/9 -> 0
    out = patch_labels(m, (2, 3), ign)
    assert out.dtype == np.int16 and out.shape == (6,)
    assert out.tolist() == [1, 2, ign, 7, 4, 0]
    # without an ignore label, 255 is an ordinary class (and wins patch 4, two pixels to one)
    assert patch_labels(m, (2, 3), None).tolist() == [1, 2, 255, 255, 255, 0]
    # one patch covering the whole non-square mask: 1 and 2 tie with 3 pixels each -> 1
    assert patch_labels(m, (1, 1), ign).tolist() == [1]
    # 1x1 patches: every pixel is its own label, ignore stays ignore
    assert np.array_equal(patch_labels(m, (4, 6), ign), m.ravel().astype(np.int16))
    with pytest.raises(VisaeError, match="does not split"):
        patch_labels(m, (3, 3), ign)


def test_patch_labels_matches_loop_on_real_camvid(camvid_dir):
    ds = open_dataset({"format": "camvid", "root": str(camvid_dir)})
    mask = ds[0].mask[:, 60:420]  # 360x360, a 24x24 grid of 15x15 patches
    out = patch_labels(mask, (24, 24), ds.ignore_index)
    assert out.shape == (576,) and out.dtype == np.int16
    expected = []
    for r in range(24):
        for c in range(24):
            px = mask[r * 15 : (r + 1) * 15, c * 15 : (c + 1) * 15].ravel()
            px = px[px != 11]
            expected.append(11 if px.size == 0 else int(np.bincount(px).argmax()))
    assert out.tolist() == expected
    assert set(out.tolist()) <= set(range(12)) and len(set(out.tolist())) >= 5


def test_patch_votes_differ_where_background_wins():
    """labelled-majority (visae) drops the ignore label; all-pixel-mode (the paper's) counts it."""
    bg = 0  # ADE20K's "other", its ignore label
    m = np.zeros((4, 6), dtype=np.int64)  # grid 2x3 of 2x2 patches
    m[0:2, 0:2] = [[bg, bg], [bg, 5]]  # 3 background, 1 object: votes differ
    m[0:2, 2:4] = [[7, 7], [bg, 3]]  # object majority either way
    m[0:2, 4:6] = bg  # all background
    m[2:4, 0:2] = [[bg, bg], [4, 4]]  # a tie between background and 4: the smaller label
    m[2:4, 2:4] = [[9, 8], [bg, bg]]  # 2 background, 1 each of 8 and 9
    m[2:4, 4:6] = [[2, 2], [2, bg]]
    assert patch_labels(m, (2, 3), bg).tolist() == [5, 7, bg, 4, 8, 2]
    assert patch_labels(m, (2, 3), bg, "labelled-majority").tolist() == [5, 7, bg, 4, 8, 2]
    assert patch_labels(m, (2, 3), bg, "all-pixel-mode").tolist() == [bg, 7, bg, bg, bg, 2]
    # a non-zero ignore label (CamVid's void, 11) wins under the paper's vote too
    assert patch_labels(np.where(m == bg, 11, m), (2, 3), 11, "all-pixel-mode").tolist() == [11, 7, 11, 4, 11, 2]
    with pytest.raises(VisaeError, match="unknown patch_vote 'mode': use one of labelled-majority, all-pixel-mode"):
        patch_labels(m, (2, 3), bg, "mode")


def test_all_pixel_mode_is_saevs_vote(camvid_dir):
    """saev 2284f52 (contrib/semseg): pixels rearranged per patch, then torch's mode (CPU)."""
    import torch

    ds = open_dataset({"format": "camvid", "root": str(camvid_dir)})
    rng = np.random.default_rng(0)
    masks = [ds[0].mask[:, 60:420], rng.integers(0, 3, size=(360, 360))]  # the random one has many ties
    for mask in masks:
        t = torch.from_numpy(mask).reshape(24, 15, 24, 15).permute(0, 2, 1, 3).reshape(24, 24, 225)
        saev = t.mode(dim=-1).values.reshape(-1)
        assert patch_labels(mask, (24, 24), 11, "all-pixel-mode").tolist() == saev.tolist()
    assert (patch_labels(masks[0], (24, 24), 11, "all-pixel-mode")
            != patch_labels(masks[0], (24, 24), 11)).any()  # real void pixels change some labels


def test_patch_vote_is_a_dataset_option(camvid_dir, fashion_mnist_dir):
    assert open_dataset({"format": "camvid", "root": str(camvid_dir)}).patch_vote == "labelled-majority"
    ds = open_dataset({"format": "camvid", "root": str(camvid_dir), "patch_vote": "all-pixel-mode"})
    assert ds.patch_vote == "all-pixel-mode" and ds.spec["patch_vote"] == "all-pixel-mode"
    with pytest.raises(VisaeError, match="^dataset key patch_vote must be one of labelled-majority, all-pixel-mode; "
                                         "got 'mode'$"):
        open_dataset({"format": "camvid", "root": str(camvid_dir), "patch_vote": "mode"})
    with pytest.raises(VisaeError, match=r"unknown key\(s\) patch_vote for dataset format imagefolder"):
        open_dataset({"format": "imagefolder", "root": str(camvid_dir), "patch_vote": "all-pixel-mode"})
    with pytest.raises(VisaeError, match="patch_vote needs segmentation masks, and this fashion-mnist dataset "
                                         "has none"):
        open_dataset({"format": "fashion-mnist", "root": str(fashion_mnist_dir), "patch_vote": "all-pixel-mode"})


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path, imagenet_sample_dir):
    from visae.data.base import decode_image

    grey = Image.open(sorted(imagenet_sample_dir.glob("*.JPEG"))[0]).convert("L")  # a real photo, 8-bit
    wide = np.asarray(grey).astype(np.uint16) * 257  # the same photo at 16 bits (255 -> 65535)
    path = tmp_path / "photo16.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I") and np.asarray(im).max() > 255  # it really is a 16-bit PNG
    out = decode_image(path)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(grey.convert("RGB")))
    # every 16-bit level rounds to the nearest 8-bit one (not all >= 255 to white)
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(path)
    got = np.asarray(decode_image(path.read_bytes(), name="ramp"))[:, :, 0].astype(np.int64)
    assert np.array_equal(got, np.round(ramp / 257).astype(np.int64))
    # a 32-bit integer greyscale image (PIL mode I), as some PNG loaders give 16-bit PNGs
    Image.fromarray(wide.astype(np.int32)).save(tmp_path / "photo32.tif")
    assert np.array_equal(np.asarray(decode_image(tmp_path / "photo32.tif")), np.asarray(grey.convert("RGB")))


# --- ADE20K and CUB layouts, built from real images --------------------------------------------


def test_ade20k_layout(tmp_path, camvid_dir):
    img_dir = tmp_path / "images" / "validation"
    ann_dir = tmp_path / "annotations" / "validation"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    ids = sorted(p.name for p in (camvid_dir / "val").iterdir())[:2]
    masks = []
    for k, name in enumerate(ids, 1):
        stem = f"ADE_val_{k:08d}"
        Image.open(camvid_dir / "val" / name).convert("RGB").save(img_dir / f"{stem}.jpg", quality=90)
        cam = np.asarray(Image.open(camvid_dir / "valannot" / name)).astype(np.uint8)
        ade = np.where(cam == 11, 0, cam + 1).astype(np.uint8)  # void -> 0 ("other")
        Image.fromarray(ade, "L").save(ann_dir / f"{stem}.png")
        masks.append(ade)
    ds = open_dataset({"format": "segfolder", "layout": "ade20k", "root": str(tmp_path)})
    assert len(ds) == 2 and ds.ignore_index == 0 and ds.spec["split"] == "validation"
    assert len(ds.classes) == 151 and ds.classes[0] == "other" and ds.classes[1] == "wall"
    assert ds.classes[150] == "flag"
    s = ds[1]
    assert s.image.size == (480, 360) and s.mask.shape == (360, 480) and s.label == -1
    assert np.array_equal(s.mask, masks[1].astype(np.int64))
    assert (s.mask == 0).any()
    assert open_dataset({"format": "ade20k", "root": str(tmp_path)}).classes == ds.classes
    (ann_dir / "ADE_val_00000002.png").unlink()
    with pytest.raises(VisaeError, match="missing annotation for image .*ADE_val_00000002.jpg"):
        open_dataset({"format": "ade20k", "root": str(tmp_path)})
    with pytest.raises(VisaeError, match="layout"):
        open_dataset({"format": "segfolder", "root": str(tmp_path)})


def test_cub_layout(tmp_path, cifar10_dir):
    root = tmp_path / "CUB_200_2011"
    rows = []  # (image id, relative path, class id 1-based, is_train)
    iid = 0
    for cid, cls in enumerate(("cat", "dog"), 1):
        folder = root / "images" / f"{cid:03d}.{cls}"
        folder.mkdir(parents=True)
        for k, f in enumerate(sorted((cifar10_dir / cls).iterdir())[:3]):
            iid += 1
            shutil.copy(f, folder / f.name)
            rows.append((iid, f"{cid:03d}.{cls}/{f.name}", cid, int(k < 2)))
    (root / "classes.txt").write_text("1 001.cat\n2 002.dog\n")
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    train = open_dataset({"format": "cub-200-2011", "root": str(tmp_path)})  # finds CUB_200_2011/
    test = open_dataset({"format": "cub-200-2011", "root": str(root), "split": "test"})
    assert train.classes == ["cat", "dog"]
    assert train.label_array().tolist() == [0, 0, 1, 1]
    assert test.label_array().tolist() == [0, 1]
    s = test[1]
    assert s.label == 1 and s.image.size == (32, 32) and s.image.mode == "RGB"
    with pytest.raises(VisaeError, match="split must be 'train' or 'test'"):
        open_dataset({"format": "cub-200-2011", "root": str(root), "split": "val"})


# --- ImageNet: HF save_to_disk copy, folder layout, and the flat sample -------------------------


def test_imagenet_hf_disk(tmp_path, cifar10_dir):
    import datasets

    files, labels = [], []
    for t, cls in enumerate(CIFAR_CLASSES[:3]):
        for f in sorted((cifar10_dir / cls).iterdir())[:2]:
            files.append(str(f))
            labels.append(t)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR_CLASSES[:3])})
    ds_hf = datasets.Dataset.from_dict({"image": files, "label": labels}, features=features)
    ds_hf.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": ds_hf, "validation": ds_hf.select([5, 0])}).save_to_disk(str(tmp_path / "dict"))

    flat = open_dataset({"format": "imagenet-1k", "root": str(tmp_path / "flat")})  # auto-detected
    assert len(flat) == 6 and flat.classes == CIFAR_CLASSES[:3]
    assert flat.label_array().tolist() == labels
    s = flat[3]
    assert s.label == 1 and s.image.mode == "RGB" and s.image.size == (32, 32)
    assert np.array_equal(np.asarray(s.image), np.asarray(Image.open(files[3]).convert("RGB")))

    val = open_dataset({"format": "imagenet-1k", "root": str(tmp_path / "dict"), "hf_disk": True})
    assert val.spec["split"] == "validation" and val.label_array().tolist() == [2, 0]
    assert val[0].label == 2
    with pytest.raises(VisaeError, match=r"split 'test' not found .*available: train, validation"):
        open_dataset({"format": "imagenet-1k", "root": str(tmp_path / "dict"), "split": "test"})


def test_imagenet_folder_and_sample(tmp_path, imagenet_sample_dir):
    sample = open_dataset({"format": "imagenet-sample", "root": str(imagenet_sample_dir)})
    assert len(sample) == 250 and len(sample.classes) == 250
    assert sample.classes[0] == "n01440764" and sample.classes == sorted(sample.classes)
    assert sample.label_array().tolist() == list(range(250))
    s = sample[0]
    assert s.image.mode == "RGB" and min(s.image.size) >= 200 and s.label == 0

    for f in sorted(imagenet_sample_dir.iterdir())[:3]:
        wnid = f.name.split("_")[0]
        (tmp_path / "val" / wnid).mkdir(parents=True)
        shutil.copy(f, tmp_path / "val" / wnid / f.name)
    ds = open_dataset({"format": "imagenet-1k", "root": str(tmp_path)})
    assert ds.classes == sample.classes[:3] and ds.label_array().tolist() == [0, 1, 2]
    assert ds[0].image.size == s.image.size
    with pytest.raises(VisaeError, match=r"split 'train' not found"):
        open_dataset({"format": "imagenet-1k", "root": str(tmp_path), "split": "train"})


# --- Fashion-MNIST -----------------------------------------------------------------------------


def test_fashion_mnist_real(fashion_mnist_dir):
    train = open_dataset(parse_dataset_arg("fashion-mnist"))
    test = open_dataset({"format": "fashion-mnist", "root": str(fashion_mnist_dir), "split": "test"})
    assert len(train) == 60_000 and len(test) == 10_000
    assert len(train.classes) == 10 and not train.has_masks and train.classes[9] == "Ankle boot"
    assert np.bincount(train.label_array()).tolist() == [6000] * 10
    assert np.bincount(test.label_array()).tolist() == [1000] * 10
    s = train[0]
    assert s.image.size == (28, 28) and s.image.mode == "RGB" and s.mask is None
    assert s.label == 9  # the first training image is an ankle boot
    rgb = np.asarray(s.image)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert test[-1].label == test.label_array()[-1]


def test_fashion_mnist_segmentation_masks(fashion_mnist_dir):
    ds = open_dataset({"format": "fashion-mnist", "root": str(fashion_mnist_dir), "segmentation": True})
    assert ds.has_masks and ds.ignore_index is None
    assert len(ds.classes) == 11 and ds.classes[10] == "background"
    for i in (0, 1, 123):
        s = ds[i]
        gray = np.asarray(s.image)[..., 0]
        assert s.mask.shape == (28, 28) and s.mask.dtype == np.int64
        assert np.array_equal(s.mask == s.label, gray > 0)
        assert set(np.unique(s.mask).tolist()) == {s.label, 10}
    strict = open_dataset({"format": "fashion-mnist", "root": str(fashion_mnist_dir), "segmentation": True, "threshold": 50})
    gray = np.asarray(strict[0].image)[..., 0]
    assert np.array_equal(strict[0].mask == 9, gray > 50)
    assert (strict[0].mask == 9).sum() < (ds[0].mask == 9).sum()
    grid = patch_labels(ds[0].mask, (4, 4), ds.ignore_index)
    assert grid.tolist() == [10, 10, 10, 10, 10, 10, 9, 9, 9, 9, 9, 9, 10, 9, 9, 9]


def test_fashion_mnist_corrupt_idx(tmp_path, fashion_mnist_dir):
    for name in FILES:
        shutil.copy(fashion_mnist_dir / name, tmp_path / name)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + b"\x00" * 100)  # a labels magic number in an image file
    ds = open_dataset({"format": "fashion-mnist", "root": str(tmp_path), "split": "test"})
    assert len(ds) == 10_000  # labels are fine
    with pytest.raises(VisaeError, match=r"corrupt idx file .*t10k-images.*magic"):
        ds[0]
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(VisaeError, match=r"corrupt idx file .*t10k-labels"):
        open_dataset({"format": "fashion-mnist", "root": str(tmp_path), "split": "test"})


def test_fetch_fashion_mnist(tmp_path, fashion_mnist_dir):
    out = tmp_path / "out"
    assert run_cli(["fetch", "fashion-mnist", "--out", str(out), "--source", str(fashion_mnist_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert all(verify_file(out / name) for name in FILES)
    # idempotent: verified files are kept, not rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    fetch_fashion_mnist(out, source=tmp_path / "nowhere", url="http://127.0.0.1:9/")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert len(open_dataset({"format": "fashion-mnist", "root": str(out), "split": "test"})) == 10_000

    # the download path, from a file:// URL, with the same checks
    dl = fetch_fashion_mnist(tmp_path / "dl", source=tmp_path / "nowhere", url=out.as_uri())
    assert sorted(p.name for p in dl.iterdir()) == sorted(FILES)

    # a tampered source copy is rejected and nothing is left under the final name
    bad = tmp_path / "bad"
    shutil.copytree(fashion_mnist_dir, bad)
    data = bytearray((bad / "train-labels-idx1-ubyte.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(bytes(data))
    out2 = tmp_path / "out2"
    with pytest.raises(VisaeError) as err:
        fetch_fashion_mnist(out2, source=bad, url="http://127.0.0.1:9/")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"Fashion-MNIST not found at {bad}")
    assert "MD5 mismatch" in msg and "download failed" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert sorted(p.name for p in out2.iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_debian_files_match_official_content(fashion_mnist_dir):
    """Debian re-compresses the files: .gz MD5s differ from the official, contents do not."""
    import hashlib

    for name, (gz_md5, raw_md5) in FILES.items():
        path = fashion_mnist_dir / name
        assert verify_file(path)
        assert hashlib.md5(gzip.open(path).read()).hexdigest() == raw_md5


# --- errors ------------------------------------------------------------------------------------


def test_corrupt_jpeg_names_the_file(tmp_path, imagenet_sample_dir):
    src = sorted(imagenet_sample_dir.iterdir())[0]
    (tmp_path / "cls").mkdir()
    bad = tmp_path / "cls" / "truncated.JPEG"
    data = src.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    ds = open_dataset({"format": "imagefolder", "root": str(tmp_path)})
    assert len(ds) == 1
    with pytest.raises(VisaeError, match=f"cannot decode image {bad}: "):
        ds[0]
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(VisaeError, match=f"cannot decode image {bad}: "):
        ds[0]


def test_spec_errors(tmp_path):
    with pytest.raises(VisaeError, match=r"unknown dataset format: 'coco'; allowed: imagefolder, fashion-mnist"):
        open_dataset({"format": "coco", "root": str(tmp_path)})
    with pytest.raises(VisaeError, match="unknown dataset format"):
        parse_dataset_arg("coco:/x")
    missing = tmp_path / "nope"
    with pytest.raises(VisaeError, match=f"not found: {missing} is not a folder"):
        open_dataset({"format": "imagefolder", "root": str(missing)})
    with pytest.raises(VisaeError, match=f"image folder {tmp_path} is empty"):
        open_dataset({"format": "imagefolder", "root": str(tmp_path)})
    (tmp_path / "cls").mkdir()
    with pytest.raises(VisaeError, match="no valid file"):
        open_dataset({"format": "imagefolder", "root": str(tmp_path)})
    with pytest.raises(VisaeError, match="needs root"):
        open_dataset({"format": "camvid"})
    with pytest.raises(VisaeError, match=r"unknown key\(s\) segmentaton .*allowed: format, root, split, name, segmentation"):
        open_dataset({"format": "fashion-mnist", "segmentaton": True})
    with pytest.raises(VisaeError, match="split must be 'train' or 'test'"):
        open_dataset({"format": "fashion-mnist", "root": str(tmp_path), "split": "val"})


def test_parse_dataset_arg():
    assert parse_dataset_arg("imagefolder:/data/x") == {"format": "imagefolder", "root": "/data/x"}
    assert parse_dataset_arg("camvid:/d/camvid") == {"format": "camvid", "root": "/d/camvid"}
    assert parse_dataset_arg("fashion-mnist") == {"format": "fashion-mnist", "root": "/usr/share/datasets/fashion-mnist"}
    with pytest.raises(VisaeError, match="needs a root"):
        parse_dataset_arg("imagefolder")
    assert set(FORMATS) >= {"imagefolder", "fashion-mnist", "segfolder", "ade20k", "camvid", "cub-200-2011", "imagenet-1k", "imagenet-sample"}


def test_cli_datasets_show(camvid_dir, fashion_mnist_dir, capsys):
    assert run_cli(["datasets", "show", f"camvid:{camvid_dir}"]) == 0
    out = capsys.readouterr().out
    assert "format: camvid" in out and "size: 101" in out and "classes: 11" in out and "has_masks: True" in out
    assert run_cli(["datasets", "show", "fashion-mnist", "--split", "test", "-o", "segmentation=true"]) == 0
    out = capsys.readouterr().out
    assert "size: 10000" in out and "classes: 11" in out and "has_masks: True" in out

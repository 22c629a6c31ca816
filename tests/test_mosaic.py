"""The Fashion-MNIST mosaic segmentation set: deterministic, 56x56 RGB for a 2x2 grid, masks of
the garments' classes on their foreground and background (10) elsewhere, no image label, no
garment used twice while the split lasts, options checked in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visae.data import open_dataset
from visae.data.fashion_mnist import BACKGROUND, CLASSES
from visae.errors import VisaeError


@pytest.fixture
def root() -> str:
    for path in (Path(__file__).resolve().parents[1] / "resources" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")):
        if (path / "t10k-images-idx3-ubyte.gz").is_file():
            return str(path)
    pytest.skip("Fashion-MNIST is absent: `visae fetch fashion-mnist --out resources/fashion-mnist`")


def _mosaic(root, **opts):
    return open_dataset({"format": "fashion-mnist-mosaic", "root": root, "split": "test", **opts})


def test_shapes_masks_and_labels(root):
    ds = _mosaic(root, size=5)
    garments = open_dataset({"format": "fashion-mnist", "root": root, "split": "test"})
    assert len(ds) == 5 and ds.has_masks and ds.ignore_index is None
    assert ds.classes == CLASSES + ["background"] and (ds.label_array() == -1).all()
    for i in range(5):
        s = ds[i]
        assert s.image.size == (56, 56) and s.image.mode == "RGB" and s.label == -1
        assert s.mask.shape == (56, 56) and s.mask.dtype == np.int64
        for k, g in enumerate(ds.garments(i)):  # row-major tiles: the garment's pixels and class
            r, c = divmod(k, 2)
            tile = np.asarray(s.image)[28 * r:28 * r + 28, 28 * c:28 * c + 28, 0]
            ref = garments[int(g)]
            assert np.array_equal(tile, np.asarray(ref.image)[..., 0])
            expected = np.where(tile > 0, ref.label, BACKGROUND)
            assert np.array_equal(s.mask[28 * r:28 * r + 28, 28 * c:28 * c + 28], expected)


def test_deterministic_and_seeded(root):
    a, b, c = _mosaic(root, size=4), _mosaic(root, size=4), _mosaic(root, size=4, seed=1)
    assert np.array_equal(np.asarray(a[3].image), np.asarray(b[3].image)) and np.array_equal(a[3].mask, b[3].mask)
    assert not np.array_equal(a.garments(0), c.garments(0))
    assert np.array_equal(_mosaic(root, size=9).garments(3), a.garments(3))  # size only adds mosaics


def test_no_garment_reused_while_the_split_lasts(root):
    ds = _mosaic(root, size=2600)  # 10,400 tiles: the 10,000 test garments, then a fresh permutation
    used = np.concatenate([ds.garments(i) for i in range(len(ds))])
    assert len(np.unique(used[:10000])) == 10000 and len(np.unique(used[10000:])) == 400


def test_grid_and_threshold(root):
    one, three = _mosaic(root, size=2, grid=1), _mosaic(root, size=2, grid=3, threshold=100)
    assert one[0].image.size == (28, 28) and len(one.garments(0)) == 1
    s = three[1]
    assert s.image.size == (84, 84) and len(three.garments(1)) == 9
    gray = np.asarray(s.image)[..., 0]
    assert ((s.mask == BACKGROUND) == (gray <= 100)).all()


@pytest.mark.parametrize("opts, message", [
    ({"grid": 0}, "option grid must be an integer 1..8; got 0"),
    ({"grid": True}, "option grid must be an integer 1..8; got True"),
    ({"size": 0}, "option size must be an integer >= 1"),
    ({"seed": -1}, "option seed must be an integer >= 0"),
    ({"threshold": 255}, "option threshold must be an integer 0..254"),
    ({"split": "val"}, "fashion-mnist-mosaic split must be 'train' or 'test'"),
    ({"segmentation": True}, "unknown key(s) segmentation for dataset format fashion-mnist-mosaic"),
])
def test_option_errors_are_one_line(root, opts, message):
    with pytest.raises(VisaeError) as err:
        _mosaic(root, **opts)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_patch_vote_is_accepted(root):
    assert _mosaic(root, size=1, patch_vote="all-pixel-mode").patch_vote == "all-pixel-mode"

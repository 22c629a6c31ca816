"""Image datasets and their labels/masks: the first stage of the data flow.

`open_dataset(spec)` turns a config entry into an `ImageDataset` of `Sample`s; every later
stage goes through this API, never through a format's files directly.
"""

from visae.data.base import ImageDataset, Sample
from visae.data.fashion_mnist import fetch_fashion_mnist
from visae.data.patches import patch_labels
from visae.data.registry import FORMATS, open_dataset, parse_dataset_arg

__all__ = [
    "FORMATS",
    "ImageDataset",
    "Sample",
    "fetch_fashion_mnist",
    "open_dataset",
    "parse_dataset_arg",
    "patch_labels",
]

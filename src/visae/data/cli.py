"""`visae fetch fashion-mnist` and `visae datasets show`: get data, and check a spec opens."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from visae.errors import VisaeError


def cmd_fetch_fashion_mnist(args: argparse.Namespace) -> int:
    from visae.data.fashion_mnist import fetch_fashion_mnist

    out = fetch_fashion_mnist(args.out, source=args.source, url=args.url)
    print(f"fashion-mnist: 4 files verified in {out}")
    return 0


def cmd_datasets_show(args: argparse.Namespace) -> int:
    from visae.data.registry import open_dataset, parse_dataset_arg

    spec = parse_dataset_arg(args.spec)
    if args.split:
        spec["split"] = args.split
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VisaeError(f"--option expects KEY=VALUE; got {item!r}")
        try:
            spec[key] = yaml.safe_load(value)  # so true/false/42 become bool/int, as in the config
        except yaml.YAMLError as err:
            raise VisaeError(f"--option {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    ds = open_dataset(spec)
    for key, value in ds.describe().items():
        print(f"{key}: {value}")
    return 0


def add_cli(subparsers) -> None:
    fetch = subparsers.add_parser("fetch")
    fsub = fetch.add_subparsers(dest="dataset", metavar="<dataset>", required=True)
    fm = fsub.add_parser("fashion-mnist", help="copy from Debian's package, or download, the four idx files")
    fm.add_argument("--out", type=Path, required=True, help="folder to put the files in")
    fm.add_argument("--source", type=Path, help="folder holding the files (default: Debian's /usr/share/datasets/fashion-mnist)")
    fm.add_argument("--url", help="download base URL (default: the official release)")
    fm.set_defaults(func=cmd_fetch_fashion_mnist)

    ds = subparsers.add_parser("datasets")
    dsub = ds.add_subparsers(dest="datasets_command", metavar="<action>", required=True)
    show = dsub.add_parser("show", help="open a dataset and print its format, size and classes")
    show.add_argument("spec", help="FORMAT[:ROOT], e.g. camvid:/data/camvid or fashion-mnist")
    show.add_argument("--split", help="split to open (default: the format's own)")
    show.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="format option, e.g. segmentation=true")
    show.set_defaults(func=cmd_datasets_show)

"""`visae verify DIR`: re-hash every file of an activation store and name what is wrong."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from visae.store.reader import verify_store


def add_cli(sub) -> None:
    p = sub.add_parser("verify", help="check an activation store's shards against their sha256",
                       description=__doc__)
    p.add_argument("stores", nargs="+", metavar="DIR", help="store directories (with meta.json)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    bad = 0
    for root in args.stores:
        problems = verify_store(root)
        meta = json.loads((Path(root) / "meta.json").read_text())
        if problems:
            bad += 1
            for problem in problems:
                print(f"{root}: {problem}", file=sys.stderr)
        else:
            files = sum(len(s["files"]) for s in meta["shards"])
            print(f"{root}: ok ({meta['n_shards']} shards, {files} files, {meta['n_images']} images)")
    return 1 if bad else 0

"""`visae verify DIR`: re-hash every file of an activation store and name what is wrong."""

from __future__ import annotations

import sys

from visae.errors import VisaeError
from visae.store.meta import StoreMeta
from visae.store.reader import verify_store


def add_cli(sub) -> None:
    p = sub.add_parser("verify", description=__doc__)
    p.add_argument("stores", nargs="+", metavar="DIR", help="store directories (with meta.json)")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    bad = 0
    for root in args.stores:
        try:
            problems = verify_store(root)
            meta = StoreMeta.load(root)
        except VisaeError as err:  # meta.json itself is bad: one line, then the next store
            problems = [str(err)]
        if problems:
            bad += 1
            for problem in problems:
                print(problem if problem.startswith(str(root)) else f"{root}: {problem}", file=sys.stderr)
        else:
            files = sum(len(s["files"]) for s in meta.shards)
            print(f"{root}: ok ({meta.n_shards} shards, {files} files, {meta.n_images} images)")
    return 1 if bad else 0

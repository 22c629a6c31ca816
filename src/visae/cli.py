"""`visae <command>`: one entry point for every stage.

Each stage module exposes `add_cli(subparsers)`, which registers its sub-command and sets
`func` on the parser. Errors the user can fix are `VisaeError` and print as one line; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from visae.args import Parser
from visae.errors import VisaeError

# Modules that register sub-commands, in the order `--help` lists them.
COMMAND_MODULES = [
    "visae.data.cli",
    "visae.models.cli",
    "visae.pretrain",
    "visae.extract",
    "visae.store.cli",
    "visae.bench",
    "visae.synth",
    "visae.sae.train",
    "visae.evaluate",
    "visae.container",
    "visae.report.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="visae", description="Sparse autoencoders on vision models, reproducibly."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("visae: interrupted", file=sys.stderr)
        return 130
    except (VisaeError, FileNotFoundError, PermissionError, OSError, ValueError, RuntimeError) as err:
        if debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"visae: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`visae <command>`: one entry point for every stage.

Commands are listed here, each with the module that implements it and its one-line help. Only the
module of the command being run is imported, so `visae --help` answers without importing torch.
Each module exposes `add_cli(subparsers)`, which registers its command(s) and sets `func`.

Errors: a mistake the user can fix (bad config, missing file, corrupt input) is a `VisaeError` (or
a missing/unreadable file) and prints as one line with exit code 1. Anything else is a bug in
visae: it prints its traceback and a line saying so, with exit code 2. `--debug` re-raises.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import traceback

from visae.args import Parser
from visae.errors import VisaeError

# name -> (module that registers it, one-line help), in the order `--help` lists them.
COMMANDS = {
    "fetch": ("visae.data.cli", "get a dataset's files, checksum-verified"),
    "datasets": ("visae.data.cli", "inspect datasets"),
    "models": ("visae.models.cli", "inspect backbones"),
    "pretrain": ("visae.pretrain.loop", "train a tiny ViT on Fashion-MNIST (supervised or SimCLR) for the offline demo"),
    "extract": ("visae.extract", "record ViT activations into activation stores"),
    "verify": ("visae.store.cli", "check an activation store's files against their sha256"),
    "bench": ("visae.tools.bench", "performance benchmarks, each against its limit"),
    "synth": ("visae.tools.synth", "write a ground-truth activation store from a planted dictionary"),
    "train": ("visae.sae.train", "train a grid of SAEs on one activation store"),
    "evaluate": ("visae.analysis.evaluate", "SAE metrics on the held-out part of a store"),
    "latents": ("visae.analysis.latent_index", "the latent index of an SAE: top images, per-class and image-level activations"),
    "profile": ("visae.analysis.profile", "abstraction, concept probe and invariance of one SAE's latents"),
    "compare": ("visae.analysis.compare", "match two SAEs' latents one-to-one (two models, or two seeds of one)"),
    "similarity": ("visae.analysis.compare", "CKA and mutual kNN between two models, per layer pair"),
    "probe": ("visae.analysis.probes", "a linear classification or segmentation probe on a model's final layer"),
    "intervene": ("visae.analysis.intervene", "edit SAE latents inside the model and score the task probe against baselines"),
    "saebench": ("visae.analysis.saebench", "vision SAEBench of one SAE: sparse probing, TPP, absorption, shrinkage, stability"),
    "sae": ("visae.sae.interop", "export an SAE to SAELens's format, import one from SAELens or saev"),
    "container": ("visae.tools.container", "build the CUDA image / run snakemake in it (Docker)"),
    "report": ("visae.report.cli", "result tables and figures from evaluations"),
}

# Errors whose cause is the user's input or environment, not visae's code.
USER_ERRORS = (VisaeError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)
# OS errors of the machine, not of the code: a full disk, a read-only or over-quota file system.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def _is_user_error(err: BaseException) -> bool:
    return isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS)


def _command_of(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full sub-parser of `command` and a help-only stub for every other
    command, so `visae --help` lists them all from the table alone."""
    parser = Parser(prog="visae", description="Sparse autoencoders on vision models, reproducibly.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    chosen = COMMANDS[command][0] if command in COMMANDS else None
    for name, (module, help_line) in COMMANDS.items():
        if module == chosen:
            if name not in sub.choices:
                importlib.import_module(module).add_cli(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser(_command_of(argv)).parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("visae: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if _is_user_error(err):
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"visae: error: {msg}", file=sys.stderr)
            return 1
        traceback.print_exc()  # a bug: show where it happened
        print(f"visae: internal error ({type(err).__name__}): this is a bug in visae, not a problem with "
              f"your input; please report it with the traceback above", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

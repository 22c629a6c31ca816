"""Argument types shared by every command, so a value that cannot be right fails at parse time
(one line naming the flag and the allowed range) before any file is touched."""

from __future__ import annotations

import argparse
import math
import re

from visae.errors import VisaeError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are VisaeErrors: the CLI prints them as one `visae: error:` line
    with exit 1, like every other bad input (argparse itself prints usage and exits 2)."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message)
        raise VisaeError(f"{self.prog}: {message}")


def _number(kind, text: str, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    value = _number(int, text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = _number(float, text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A fraction strictly between 0 and 1 (e.g. a held-out share)."""
    value = _number(float, text, "a number in (0, 1)")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


def device(text: str) -> str:
    """A torch device that exists here: cpu, cuda or cuda:N (N < the GPU count). MPS is refused:
    the metrics and normalisation accumulate in float64, which it lacks."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} requested but no CUDA GPU is available: use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} GPU(s) here")
    elif dev.type == "mps":
        raise argparse.ArgumentTypeError("'mps' is not supported (metrics accumulate in float64, which MPS lacks): "
                                         "use cpu or cuda")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: use cpu, cuda or cuda:N")
    return text

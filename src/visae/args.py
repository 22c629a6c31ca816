"""Argument types shared by every command, so a value that cannot be right fails at parse time
(one line naming the flag and the allowed range) before any file is touched."""

from __future__ import annotations

import argparse
import json
import math
import re

from visae.errors import VisaeError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are VisaeErrors: the CLI prints them as one `visae: error:` line
    with exit 1, like every other bad input (argparse itself prints usage and exits 2)."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message)
        raise VisaeError(f"{self.prog}: {message}")


def _ranged(kind, what: str, ok, name: str):
    """An argparse type: `kind(text)`, finite, and `ok(value)`; else one line saying `what` it must be."""
    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


positive_int = _ranged(int, "a positive integer", lambda v: v >= 1, "positive_int")
nonneg_int = _ranged(int, "an integer >= 0", lambda v: v >= 0, "nonneg_int")
positive_float = _ranged(float, "a positive number", lambda v: v > 0, "positive_float")
nonneg_float = _ranged(float, "a number >= 0", lambda v: v >= 0, "nonneg_float")
# a fraction strictly between 0 and 1 (e.g. a held-out share)
open_fraction = _ranged(float, "a number in (0, 1)", lambda v: 0 < v < 1, "open_fraction")
# a fraction in (0, 1] (a threshold relative to a maximum)
unit_fraction = _ranged(float, "a number in (0, 1]", lambda v: 0 < v <= 1, "unit_fraction")


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


def json_object(text: str, flag: str = "the argument") -> dict:
    """A command-line argument that must be a JSON object (a config entry, a hierarchy)."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise VisaeError(f"{flag} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise VisaeError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value

"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A reader (or a later pipeline stage) never sees a half-written file under the final name.
A kill between creating the temporary file and the rename leaves it behind, so every command
calls `clean_stale_temps(out)` on its output folder before it writes there: temporary names
all match `TEMP_GLOB` (`.<name>.<random>.tmp` here, `.<name>.tmp` for store shards).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
TEMP_GLOB = ".*.tmp"  # every temporary file visae writes, and nothing else it writes


def temp_path_for(path: Path) -> Path:
    """A fresh temporary file next to `path`, named to match TEMP_GLOB."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def clean_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed run left anywhere under `root`; return them.
    Safe because one output folder has one writer at a time (a job owns its outputs)."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.rglob(TEMP_GLOB) if p.is_file() or p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

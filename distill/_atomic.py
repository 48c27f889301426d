"""Atomic file writes for distill's outputs (checkpoints, feature shards, reports, budget / sensitivity / plots) and
the bench/ scripts (tmp file in the same folder, then rename).

A crash or a kill in the middle of a write must never leave a half-written JSON or PNG that a later run
would read as valid, so every writer goes through here: the data lands in a temporary file next to the
target (same file system, so os.replace is atomic) and only a complete file is renamed over the target."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, sync: bool = True) -> Path:
    """Call write(fileobj) on a temporary file next to `path`, fsync it (unless `sync` is False: scratch files such
    as spilled feature shards need not survive a power cut), then rename it over `path`."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise ValueError(f"path: {str(path)!r} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # not on Windows before Python 3.13
                os.fchmod(f.fileno(), 0o644)  # mkstemp makes the file private (0600); results are meant to be read
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no stray temporary behind; the target keeps its previous content (or stays absent).
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike, *, sync: bool = True) -> Path:
    """torch.save(obj) atomically (checkpoints, feature shards)."""
    import torch

    return atomic_write_bytes(path, lambda f: torch.save(obj, f), sync=sync)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) atomically: the benchmark scripts' tables and JSON go through here too."""
    data = text.encode()
    return atomic_write_bytes(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically. NaN/inf are rejected (they are not valid JSON)."""
    data = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False).encode() + b"\n"
    return atomic_write_bytes(path, lambda f: f.write(data))


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file with errors that say which file and what it was supposed to be."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {str(path)!r} is not valid JSON ({e})") from e

"""Checks of `tnk compress --out DIR`, run before anything slow: the folder can be written, and it does not hold
the outputs of the other kind of run (ResNet vs Hugging Face), whose slices would mix with this run's.

The kind of a run is recorded in OUT/run.json: ``{"kind": "resnet"}`` for a ResNet run, the fingerprint file of
``distill.fingerprint.claim`` (``"kind": "hf"``) for a Hugging Face run. Folders written before the kind was
recorded are recognised by their report.json or their slice names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ._atomic import atomic_write_text, read_json

RUN_FILE = "run.json"
KINDS = {"resnet": "a ResNet run (tnk compress --model resnet18/resnet34)", "hf": "a Hugging Face run"}


def check_out(out: str | os.PathLike, flag: str = "--out") -> Path:
    """ValueError when `out` is a file, lies under a file, or cannot be created or written by this user."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {out}: is a file, not a folder; give a folder (it is created if missing)")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {out}: {probe} is a file, so the folder cannot be created; give another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (its parent {probe} is not writable, so it cannot be created)"
        raise ValueError(f"{flag} {out}: not writable by this user{where}; give a folder you can write to")
    return path


def json_or_empty(path: Path) -> dict:
    """The dict in a JSON file; {} when it is missing, unreadable or not a JSON object (a folder's kind is then
    told from its other files, and a fingerprint check treats it as another run's)."""
    try:
        data = read_json(path, "run folder")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def existing_kind(out: str | os.PathLike) -> str | None:
    """'resnet', 'hf' or None (an empty or unknown folder) for the outputs already in `out`."""
    out = Path(out)
    if (out / RUN_FILE).is_file():
        data = json_or_empty(out / RUN_FILE)
        return data.get("kind") or ("hf" if "fingerprint" in data else None)
    report = json_or_empty(out / "report.json") if (out / "report.json").is_file() else {}
    if "model_family" in report:
        return "hf"
    if "teacher_accuracy" in report:
        return "resnet"
    names = [p.stem for p in (out / "slices").glob("*.pt")] if (out / "slices").is_dir() else []
    if names:  # ResNet slices are named layer1, layer1.0, layer1.0.conv1, ...; Hugging Face ones h.0.mlp, ...
        return "resnet" if all(re.match(r"layer\d", n) for n in names) else "hf"
    return None


def check_kind(out: str | os.PathLike, kind: str) -> None:
    """ValueError when `out` holds the outputs of the other kind of run."""
    before = existing_kind(out)
    if before is not None and before != kind:
        raise ValueError(
            f"{out} holds the slices of another run ({KINDS.get(before, before)}; this is {KINDS[kind]}); use a "
            f"fresh --out DIR, or delete {out} to start over"
        )


def claim_resnet(out: str | os.PathLike) -> None:
    """Record that `out` holds a ResNet run (the Hugging Face pipeline records its own run.json)."""
    check_kind(out, "resnet")
    if not (Path(out) / RUN_FILE).is_file():
        atomic_write_text(Path(out) / RUN_FILE, json.dumps({"kind": "resnet"}) + "\n")


def clean_stale_tmp(out: str | os.PathLike) -> list[str]:
    """Remove OUT/.compressed.tmp-* folders that a killed save_compressed left behind; return their names."""
    stale = sorted(p for p in Path(out).glob(".compressed.tmp-*") if p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]

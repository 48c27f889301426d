"""A run's fingerprint: a digest of everything that decides its trained slices (the teacher's weights, the
calibration data, the slices and the settings), kept beside the run's outputs so that a rerun in the same output
folder resumes only the same run and never mixes the slices or cached features of two setups."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from ._atomic import atomic_write_text
from .out_dir import RUN_FILE, check_kind, json_or_empty


def digest(tensors: Iterable[tuple[str, torch.Tensor]], meta: dict) -> str:
    """16 hex digits of sha1 over named tensors (name, shape, dtype and bytes) and a JSON-able dict."""
    h = hashlib.sha1()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def claim(out: str | Path, fingerprint: str, settings: dict, kind: str = "hf") -> None:
    """Record `fingerprint` in OUT/run.json, or raise ValueError if OUT holds another run's outputs (of another
    setup, or of the other kind of run: `kind` is "hf" for the Hugging Face pipeline, see distill/out_dir.py)."""
    check_kind(out, kind)
    path = Path(out) / RUN_FILE
    if path.is_file():
        before = json_or_empty(path)
        if before.get("fingerprint") != fingerprint:
            changed = sorted(k for k in settings if before.get("settings", {}).get(k) != settings[k])
            what = f"settings {', '.join(changed)} differ" if changed else "the model or calibration data differ"
            raise ValueError(
                f"{out} holds the slices of another run ({what}: {path}); use a fresh --out DIR, or delete "
                f"{out} to start over. A rerun with the same model, data and settings resumes where it stopped"
            )
        return
    atomic_write_text(
        path, json.dumps({"kind": kind, "fingerprint": fingerprint, "settings": settings}, indent=2, default=str)
    )

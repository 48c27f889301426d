"""Checks of `tnk`'s numeric flags and --device, run before anything slow (loading a model, training a teacher).

Every entry point uses it: `tnk compress / eval / sensitivity` and `python -m distill.hf.pipeline`. A flag left
out (None) keeps its default and is not checked here.
"""

from __future__ import annotations

import argparse
import math

# flag -> (test, what the value must be); nan fails every comparison, inf is refused where a number is needed
_RULES = {
    "ratio": (lambda v: v > 1.0 and math.isfinite(v), "> 1 and finite (dense / tensorized parameters, e.g. 2 or 4)"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0.0 and math.isfinite(v), "> 0 and finite"),
    "head_lr": (lambda v: v > 0.0 and math.isfinite(v), "> 0 and finite"),
    "kd_weight": (lambda v: v >= 0.0 and math.isfinite(v), ">= 0 and finite"),
    "threads": (lambda v: v >= 1, ">= 1"),
    "workers": (lambda v: v >= 1, ">= 1"),
    "calib_fraction": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "memory_budget_mb": (lambda v: v > 0.0, "> 0"),
    "max_seconds_per_slice": (lambda v: v > 0.0, "> 0"),
    "seq_len": (lambda v: v >= 2, ">= 2"),
    "num_samples": (lambda v: v >= 1, ">= 1"),
    "group_size": (lambda v: v >= 1, ">= 1"),
    "num_cores": (lambda v: v >= 2, ">= 2"),
    "teacher_epochs": (lambda v: v >= 1, ">= 1"),
}


def check_compress_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first flag whose value is out of range, or a CUDA device this machine lacks."""
    for name, (ok, must) in _RULES.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {must}, got {value}")
    device = getattr(args, "device", None)
    if device:
        check_device(device)


def check_device(device) -> None:
    """ValueError, before anything slow, for a --device torch cannot parse, CUDA on a machine without it, or a
    GPU index this machine does not have (`cuda:1` with one GPU failed only at the first tensor moved there)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device}: not a device ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"--device {device}: this machine has {n} GPU(s), cuda:0 ... cuda:{n - 1}")

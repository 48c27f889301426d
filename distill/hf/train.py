"""Tensorize one Hugging Face slice and train it alone to reproduce the teacher's slice output.

Loss: MSE over real (non-padding) tokens, divided by the teacher output's variance over those tokens, so the
number reads the same for every slice (1.0 = as bad as predicting the mean). AdamW with a cosine schedule and
warm-up, early stopping on a held-out calibration batch (the best state is restored). The student runs in eval
mode: dropout would only add noise to a regression target, and LayerNorm has no running statistics to protect.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from collections.abc import Sequence

import torch
from torch import nn

import tnkernels
from distill.slices import SliceSpec, set_submodule
from tnkernels.convert import LayerReport, TensorizeReport

from .presets import run_hf_slice
from .whiten import input_moments, is_linear, whitened_lowrank

INITS = ("whitened", "plain")


def tensorize_slice(
    modules: Sequence[nn.Module],
    *,
    ratio: float,
    attention: bool,
    attention_patterns: Sequence[str],
    num_cores: int | None = None,
    init: str = "plain",
    data: Sequence[dict] | None = None,
) -> tuple[nn.ModuleList, object]:
    """Deep copies of ``modules`` with their Linear / Conv1D layers tensorized at ``ratio``.

    Attention projections (names matching ``attention_patterns``) stay dense unless ``attention``. Returns
    ``(student ModuleList, tnkernels TensorizeReport)``.

    ``init="plain"``: ``tnkernels.tensorize`` (TT-SVD of each weight, structure from the planner or
    ``num_cores``). ``init="whitened"``: activation-whitened low-rank factors fitted to the slice's captured
    inputs ``data`` (``whiten.py``; measured several times more accurate on MiniLM, docs/hf.md).
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}; use one of {INITS}")
    student = nn.ModuleList(copy.deepcopy(m) for m in modules)
    names = [n for n, _ in student.named_modules() if n]
    skip = []
    if not attention:
        skip = [p for p in attention_patterns if any(fnmatch.fnmatchcase(n, p) for n in names)]
    if init == "whitened":
        if not data:
            raise ValueError("init='whitened' needs the slice's captured batches (data=...)")
        if num_cores not in (None, 2):
            raise ValueError(
                f"num_cores={num_cores}: init='whitened' builds 2-core low-rank layers; drop --num-cores "
                "or use --init plain"
            )
        return student, _whitened(student, skip, ratio, data)
    rules = {**{p: None for p in skip}, "*": {}} if skip else None
    report = tnkernels.tensorize(student, ratio=ratio, rules=rules, num_cores=num_cores)
    return student, report


def _whitened(student: nn.ModuleList, skip: Sequence[str], ratio: float, data: Sequence[dict]):
    targets = {
        n: m
        for n, m in student.named_modules()
        if n and is_linear(m) and not any(fnmatch.fnmatchcase(n, p) for p in skip)
    }
    moments = input_moments(student, targets, data)  # the student is still the dense teacher copy here
    report = TensorizeReport()
    for name, module in targets.items():
        if name not in moments:
            raise ValueError(f"layer {name!r} of the slice never ran on the captured batches")
        t0 = time.perf_counter()
        weight = (module.weight if isinstance(module, nn.Linear) else module.weight.t()).detach()
        new = whitened_lowrank(module, *moments[name], ratio=ratio)
        with torch.no_grad():
            err = (torch.linalg.norm(new.to_dense() - weight) / torch.linalg.norm(weight).clamp_min(1e-30)).item()
        set_submodule(student, name, new)
        before, after = weight.numel(), new.num_weight_params
        report.rows.append(
            LayerReport(
                name, "mpo", tuple(weight.shape), before, after, before / after, err,
                time.perf_counter() - t0, "tensorized", f"whitened low-rank, bond {new.bonds[0]}",
            )
        )  # fmt: skip
    return report


def _masked_nmse(pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    m = token_mask.unsqueeze(-1).to(pred.dtype)
    count = m.sum().clamp_min(1.0) * pred.shape[-1]
    mse = ((pred - target) ** 2 * m).sum() / count
    mean = (target * m).sum(dim=(0, 1)) / m.sum().clamp_min(1.0)
    var = (((target - mean) ** 2) * m).sum() / count
    return mse / var.clamp_min(1e-12)


@torch.no_grad()
def evaluate_slice(student: nn.ModuleList, data: Sequence[dict]) -> float:
    """Token-weighted normalised MSE of ``student`` on captured batches."""
    student.eval()
    total, weight = 0.0, 0.0
    for d in data:
        w = d["token_mask"].sum().item()
        total += _masked_nmse(run_hf_slice(student, d["x"], d["kwargs"]), d["y"], d["token_mask"]).item() * w
        weight += w
    return total / max(weight, 1.0)


def train_slice(
    spec: SliceSpec,
    student: nn.ModuleList,
    data: Sequence[dict],
    *,
    steps: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: int = 10,
    eval_every: int = 25,
    patience: int = 4,
    max_seconds: float | None = None,
) -> dict:
    """Train ``student`` in place on captured ``data`` batches (``load_slice_features``) and return stats.

    The last batch is held out for early stopping when there are at least two; with one batch it is used for
    both (then early stopping only guards against divergence).
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    if not data:
        raise ValueError(f"slice {spec.name!r}: no captured batches to train on")
    train, val = (data[:-1], data[-1:]) if len(data) > 1 else (data, data)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.perf_counter()
    initial = evaluate_slice(student, val)
    best, best_state, bad_evals, step = initial, copy.deepcopy(student.state_dict()), 0, 0
    gen = torch.Generator().manual_seed(0)
    student.eval()
    # Whether a loss since the last evaluation was not finite, kept on the device and read at evaluations only: a
    # host read every step made the CPU wait for the GPU at every step instead of queueing the next one.
    nonfinite, last_eval = None, 0
    for step in range(1, steps + 1):
        d = train[int(torch.randint(len(train), (1,), generator=gen))]
        loss = _masked_nmse(run_hf_slice(student, d["x"], d["kwargs"]), d["y"], d["token_mask"])
        bad = ~torch.isfinite(loss.detach())
        nonfinite = bad if nonfinite is None else nonfinite | bad
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        timed_out = max_seconds is not None and time.perf_counter() - start > max_seconds
        if step % eval_every == 0 or step == steps or timed_out:
            if nonfinite is not None and nonfinite:
                raise FloatingPointError(
                    f"slice {spec.name!r}: the training loss was not finite between steps {last_eval + 1} and "
                    f"{step}; lower --lr"
                )
            last_eval = step
            val_loss = evaluate_slice(student, val)
            if val_loss < best:
                best, best_state, bad_evals = val_loss, copy.deepcopy(student.state_dict()), 0
            else:
                bad_evals += 1
            if bad_evals >= patience or timed_out:
                break
    student.load_state_dict(best_state)
    return {
        "slice": spec.name,
        "initial_nmse": initial,
        "final_nmse": best,
        "steps": step,
        "seconds": time.perf_counter() - start,
    }

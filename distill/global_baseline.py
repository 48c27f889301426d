"""Global baseline: end-to-end fine-tuning of an already tensorized model on the task loss.

This is what slice-wise distillation is compared against (issue 4, item 6): the same tensorization, then
ordinary training of the whole student on cross-entropy, optionally plus logit distillation (KL divergence
to the teacher's softened logits, Hinton et al. 2015). To make the comparison fair it runs under a wall-
clock budget: the clock covers everything a training step costs (data loading, the teacher's forward for KD,
forward, backward, optimizer), the learning rate follows a cosine schedule over the budget (or over the
epochs, whichever ends first), and a step is not started when the measured average step time says it would
end past the budget. Time spent in the optional ``eval_fn`` callback is not charged to the budget.

BatchNorm layers are in train mode here (running statistics adapt), as in any end-to-end fine-tune; the
student is left in eval mode on return."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by T^2 so gradients keep their size."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (t * t)


def _check_args(student, teacher, kd_weight, temperature, time_budget_s, epochs, lr, weight_decay) -> None:
    if not isinstance(student, nn.Module):
        raise TypeError(f"global_finetune: student must be an nn.Module, got {type(student).__name__}")
    if not 0.0 <= float(kd_weight) <= 1.0:
        raise ValueError(f"global_finetune: kd_weight must be in [0, 1] (0 = cross-entropy only), got {kd_weight}")
    if kd_weight > 0 and teacher is None:
        raise ValueError("global_finetune: kd_weight > 0 needs teacher=...; pass the dense model or set kd_weight=0")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"global_finetune: teacher must be an nn.Module, got {type(teacher).__name__}")
    if not temperature > 0:
        raise ValueError(f"global_finetune: temperature must be > 0, got {temperature}")
    if time_budget_s is None and epochs is None:
        raise ValueError("global_finetune: give time_budget_s=... (seconds) and/or epochs=... so training can stop")
    if time_budget_s is not None and not (math.isfinite(time_budget_s) and time_budget_s > 0):
        raise ValueError(f"global_finetune: time_budget_s must be a positive number of seconds, got {time_budget_s}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"global_finetune: epochs must be a positive integer, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"global_finetune: lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"global_finetune: weight_decay must be >= 0, got {weight_decay}")


def global_finetune(
    student: nn.Module,
    train_loader: Iterable,
    *,
    teacher: nn.Module | None = None,
    kd_weight: float = 0.0,
    temperature: float = 4.0,
    time_budget_s: float | None = None,
    epochs: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    device: str | torch.device = "cpu",
    progress: bool = True,
    eval_fn: Callable[[nn.Module], float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Fine-tune `student` end to end on cross-entropy (+ optional KD), within a time budget and/or epochs.

    Args:
        student: the tensorized model (e.g. after ``tnkernels.tensorize``); trained in place.
        train_loader: re-iterable batches of (inputs, integer labels), e.g. a DataLoader.
        teacher: the dense model, needed when kd_weight > 0 (run in eval mode, no gradients).
        kd_weight: loss = (1 - kd_weight) * CE + kd_weight * T^2 * KL(teacher || student) at temperature T.
        temperature: the KD temperature T.
        time_budget_s: wall-clock budget in seconds; training stops before a step that would overrun it.
        epochs: maximum passes over train_loader.
        lr: AdamW peak learning rate (cosine decay to 0 over the budget / epochs).
        weight_decay: AdamW weight decay.
        device: where to train.
        progress: show a tqdm bar.
        eval_fn: optional model -> float called after every epoch (and at the end); its time is not charged.
        clock: what the budget is measured with: wall-clock by default; time.process_time charges this process's
            CPU time instead (a fairer budget on a machine shared with other jobs, if the other side is timed
            the same way).

    Returns:
        dict(history=[per-epoch dicts: epoch, step, seconds, loss, ce, kd, lr, (eval)], step_losses=[float],
        seconds=training wall-clock, steps=int, stopped_by="time" | "epochs").
    """
    _check_args(student, teacher, kd_weight, temperature, time_budget_s, epochs, lr, weight_decay)
    device = torch.device(device)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("global_finetune: student has no trainable parameters (all requires_grad=False)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    total_steps = epochs * steps_per_epoch if (epochs is not None and steps_per_epoch) else None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="global fine-tune", unit="step")

    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    charged = 0.0  # seconds charged to the budget (excludes eval_fn)
    step = 0
    epoch = 0
    stopped_by = "epochs"

    def frac_done() -> float:
        f = 0.0
        if time_budget_s is not None:
            f = max(f, charged / time_budget_s)
        if total_steps:
            f = max(f, step / total_steps)
        return min(f, 1.0)

    def run_eval(entry: dict[str, Any]) -> None:
        if eval_fn is not None:
            student.eval()
            entry["eval"] = float(eval_fn(student))
            student.train()

    try:
        out_of_time = False
        while (epochs is None or epoch < epochs) and not out_of_time:
            sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
            n = 0
            t_mark = clock()
            for batch in train_loader:
                if not isinstance(batch, list | tuple) or len(batch) < 2:
                    raise ValueError("global_finetune: train_loader must yield (inputs, labels) batches")
                # Predict the step's cost from the average so far; never start a step that would overrun.
                if time_budget_s is not None:
                    elapsed = charged + (clock() - t_mark)
                    avg = charged / step if step else 0.0
                    if elapsed + avg > time_budget_s:
                        out_of_time = True
                        break
                x, y = batch[0].to(device), batch[1].to(device)
                cur_lr = lr * 0.5 * (1.0 + math.cos(math.pi * frac_done()))
                for g in opt.param_groups:
                    g["lr"] = cur_lr
                logits = student(x)
                ce = F.cross_entropy(logits, y)
                if kd_weight > 0:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    kd = kd_loss(logits, t_logits, temperature)
                    loss = (1.0 - kd_weight) * ce + kd_weight * kd
                else:
                    kd = torch.zeros((), device=device)
                    loss = ce
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"global_finetune: loss became {loss.item()} at step {step}; lower lr (now {lr})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                now = clock()
                charged += now - t_mark
                t_mark = now
                step += 1
                n += 1
                step_losses.append(loss.item())
                sums["loss"] += loss.item()
                sums["ce"] += ce.item()
                sums["kd"] += kd.item()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", t=f"{charged:.0f}s")
            else:
                epoch += 1
            if n == 0 and not out_of_time:
                raise ValueError("global_finetune: train_loader yielded no batches")
            if n:
                entry = {
                    "epoch": epoch if not out_of_time else epoch + n / (steps_per_epoch or n),
                    "step": step,
                    "seconds": charged,
                    "lr": cur_lr,
                    **{k: v / n for k, v in sums.items()},
                }
                run_eval(entry)
                history.append(entry)
        if out_of_time:
            stopped_by = "time"
    finally:
        if bar is not None:
            bar.close()
        student.eval()
    return {
        "history": history,
        "step_losses": step_losses,
        "seconds": charged,
        "steps": step,
        "stopped_by": stopped_by,
    }

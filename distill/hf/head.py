"""A causal LM's output head as one more slice (GPT-2's ``lm_head``).

Decoding reads every weight once per generated token, and GPT-2's head (vocabulary x hidden, tied to the input
embedding) is a third of GPT-2 small's weights: with only the blocks tensorized it bounds the decode speed-up
(``bench/hf_generate.py``). ``tensorize`` leaves tied layers dense, so the head gets its own slice here:

1. its inputs, the final hidden states, are captured on the calibration text from the model as it is, i.e. after
   the blocks were compressed (as sequential slices see their inputs);
2. the head is untied from the input embedding (which stays dense: a lookup costs no GEMM) and initialised as a
   whitened low-rank ``MPOLinear`` on those inputs (``whiten.py``);
3. it is trained to match the dense head's next-token distribution on the same inputs, KL(teacher || student)
   per token, with a tenth of the tokens held out to keep the best state.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from tnkernels import MPOLinear

from .whiten import whitened_lowrank


def output_head(model: nn.Module) -> nn.Linear:
    """The model's dense LM head; a clear error for models without one (encoders) or already tensorized."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"--head: {type(model).__name__} has no dense lm_head to tensorize (only causal LMs such as GPT-2 have "
            f"one{'; it is already tensorized' if isinstance(head, MPOLinear) else ''})"
        )
    return head


@torch.no_grad()
def capture_head_inputs(model: nn.Module, calib: list[dict]) -> torch.Tensor:
    """``[tokens, hidden]`` float32: what the head receives on the calibration batches (every position)."""
    head = output_head(model)
    rows: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    device = head.weight.device
    try:
        for batch in calib:
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        handle.remove()
    return torch.cat(rows).float()


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher) || softmax(student))."""
    return F.kl_div(
        F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True, reduction="batchmean"
    )


def distill_head(
    model: nn.Module,
    calib: list[dict],
    *,
    ratio: float,
    steps: int,
    lr: float,
    batch_tokens: int = 512,
    seed: int = 0,
) -> tuple[MPOLinear, dict]:
    """The head slice (module doc): returns the trained ``MPOLinear`` and its stats; ``model`` is not changed."""
    head = output_head(model)
    x = capture_head_inputs(model, calib)
    n_val = max(1, len(x) // 10)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    train_x, val_x = x[order[n_val:]], x[order[:n_val]]
    if len(train_x) == 0:
        raise ValueError(f"--head: {len(x)} calibration tokens are too few to fit and check the head")
    xd = train_x.double()
    student = whitened_lowrank(head, xd.T @ xd, len(train_x), ratio=ratio).to(x.device)
    weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()

    def val_kl() -> float:
        with torch.no_grad():
            return sum(
                _kl(student(v), F.linear(v, weight, bias)).item() * len(v) for v in val_x.split(batch_tokens)
            ) / len(val_x)

    initial = best = val_kl()
    best_state = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = train_x[torch.randint(len(train_x), (min(batch_tokens, len(train_x)),), generator=g)]
        with torch.no_grad():
            target = F.linear(rows, weight, bias)
        loss = _kl(student(rows), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps:
            now = val_kl()
            if now < best:
                best, best_state = now, {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(best_state)
    stats = {
        "slice": "lm_head",
        "tokens": len(x),
        "initial_kl": initial,
        "final_kl": best,
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "ratio": student.compression_ratio,
    }
    return student, stats


def install_head(model: nn.Module, student: MPOLinear) -> None:
    """Put a tensorized head in ``model``, untied from the input embedding (which keeps its own dense weight)."""
    model.lm_head = student
    model.config.tie_word_embeddings = False

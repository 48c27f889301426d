"""Baselines the slice-wise method is compared with: one-shot decomposition and global fine-tuning.

* one-shot: ``tnkernels.tensorize`` on the same layers, no training at all.
* global: the one-shot model trained end to end for a wall-clock budget to reproduce the teacher's
  final hidden states (normalised MSE over real tokens), the usual "fine-tune after compression" recipe.
  Given the same time as the slice-wise training, it is the fair comparison asked for.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
from torch import nn

import tnkernels

from .models import base_model, block_names, family_of

# Per family, the linear layers of a block (names relative to the block): the FFN's, and the attention's
_FFN_LINEARS = {
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
    "bert": ("intermediate.dense", "output.dense"),
    "distilbert": ("ffn.lin1", "ffn.lin2"),
    "llama": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
_ATTENTION_LINEARS = {
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "distilbert": ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
}


def ffn_rules(model: nn.Module, ratio: float, *, attention: bool = False) -> dict:
    """tensorize rules (names relative to the *base* model) for the FFN layers, and attention if asked.

    Exact names, not globs: fnmatch's ``*`` crosses dots, so ``encoder.layer.*.output.dense`` would also catch
    ``encoder.layer.0.attention.output.dense``.
    """
    fam = family_of(model)
    layers = _FFN_LINEARS[fam] + (_ATTENTION_LINEARS[fam] if attention else ())
    names = [f"{b}.{layer}" for b in block_names(model) for layer in layers]
    return {n: {"ratio": ratio} for n in names}


def one_shot(model: nn.Module, ratio: float, *, attention: bool = False, num_cores: int | None = None) -> nn.Module:
    """A deep copy of ``model`` with its FFN (and optionally attention) layers tensorized, no training."""
    student = copy.deepcopy(model).eval()
    tnkernels.tensorize(base_model(student), rules=ffn_rules(model, ratio, attention=attention), num_cores=num_cores)
    return student


def global_finetune(
    student: nn.Module,
    teacher: nn.Module,
    calib: Sequence[dict],
    *,
    seconds: float,
    lr: float = 1e-4,
    max_steps: int = 10**9,
) -> dict:
    """Train every parameter of ``student`` for ``seconds`` to match ``teacher``'s last hidden states."""
    if not calib:
        raise ValueError("global_finetune needs calibration batches")
    s_base, t_base = base_model(student), base_model(teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    start, step, losses = time.perf_counter(), 0, []
    gen = torch.Generator().manual_seed(0)
    student.eval()  # no dropout, as in the slice-wise training
    while time.perf_counter() - start < seconds and step < max_steps:
        batch = calib[int(torch.randint(len(calib), (1,), generator=gen))]
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).unsqueeze(-1).float()
        with torch.no_grad():
            target = t_base(**batch).last_hidden_state
        pred = s_base(**batch).last_hidden_state
        count = mask.sum() * pred.shape[-1]
        mean = (target * mask).sum((0, 1)) / mask.sum()
        var = (((target - mean) ** 2) * mask).sum() / count
        loss = (((pred - target) ** 2) * mask).sum() / count / var
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"global fine-tuning diverged at step {step}; lower lr")
    return {
        "steps": step,
        "seconds": time.perf_counter() - start,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "blocks": len(block_names(student)),
    }

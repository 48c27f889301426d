"""The modes a call can be made in, which decide how it must run: one rule each, shared by every entry point.

- autograd recording (`needs_autograd`): the planned Functions and the kept intermediates only when a backward
  can follow;
- a torch.func transform (`under_functorch`): no planned Function, no native kernel, plain differentiable ops;
- torch.autocast (`autocast_dtype`, `cast_for_autocast`): operands cast to autocast's dtype, autocast off inside;
- torch.jit.trace (`refuse_jit_trace`): refused with a pointer to torch.export.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def needs_autograd(x: torch.Tensor, params: Iterable[torch.Tensor | None], bias: torch.Tensor | None = None) -> bool:
    """Whether a call on x with these parameters records autograd (grad mode on and anything requiring grad)."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or any(p is not None and p.requires_grad for p in params)
        or (bias is not None and bias.requires_grad)
    )


def under_functorch() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, jvp, ...) is running. The planned autograd Functions
    and the native kernels cannot run under one (old-style Functions, opaque C++ calls), so calls then take plain
    differentiable torch ops. Never true while torch.compile traces (dynamo would break the graph on the check)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls and convolutions in on x's device, or None when autocast is off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def cast_for_autocast(amp: torch.dtype, tensors):
    """float32 tensors cast to `amp` (differentiably), as autocast casts nn.Linear's and nn.Conv2d's operands."""
    return [t.to(amp) if t is not None and t.dtype == torch.float32 else t for t in tensors]


def refuse_jit_trace(where: str) -> None:
    """Raise under torch.jit.trace. The planner's Python (plan lookups, the first call's timings on random
    tensors) ran inside the trace and met sizes traced as tensors: the trace failed deep inside a timing
    ("manual_seed expected a long"), or recorded a timing's ops and failed its sanity check, depending on what was
    already cached. TorchScript is in maintenance mode; torch.export captures these layers (dynamic batch too)."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            f"{where}: torch.jit.trace is not supported; export the model with torch.export.export(model, (x,)) "
            "(a dynamic batch works: dynamic_shapes), or compile it with torch.compile"
        )


def refuse_jit_script(where: str) -> None:
    """What torch.jit.script meets (through the layers' __prepare_scriptable__ hook) instead of failing to compile
    the planner's Python with "Cannot create dict for key type 'tuple'"."""
    raise RuntimeError(
        f"{where}: torch.jit.script is not supported (the layer plans its contraction in Python); export the "
        "model with torch.export.export(model, (x,)), or compile it with torch.compile"
    )

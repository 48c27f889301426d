"""The modes a call can be made in, which decide how it must run: one rule each, shared by every entry point.

- autograd recording (`needs_autograd`): the planned Functions and the kept intermediates only when a backward
  can follow;
- a torch.func transform or forward-mode AD (`under_transform_or_dual`): no planned Function (they have no
  jvp), no native kernel, no detached operand: plain differentiable ops;
- torch.autocast (`autocast_dtype`, `run_in_autocast_dtype`): operands cast to autocast's dtype, autocast off inside;
- a differentiated backward (`grads_of_rerun`): the forward run again with autograd on and differentiated;
- torch.jit.trace (`refuse_jit_trace`): refused with a pointer to torch.export.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.autograd.forward_ad as forward_ad


def needs_autograd(x: torch.Tensor, params: Iterable[torch.Tensor | None], bias: torch.Tensor | None = None) -> bool:
    """Whether a call on x with these parameters records autograd (grad mode on and anything requiring grad)."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or any(p is not None and p.requires_grad for p in params)
        or (bias is not None and bias.requires_grad)
    )


def under_transform_or_dual() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, jvp, ...) is running. The planned autograd Functions
    and the native kernels cannot run under one (old-style Functions, opaque C++ calls), so calls then take plain
    differentiable torch ops. Also true inside torch.autograd.forward_ad.dual_level(): dual tensors need the same
    (a detached operand dropped its tangent, and the Functions have no jvp). Never true while torch.compile traces
    (dynamo would break the graph on the check)."""
    return not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    )


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls and convolutions in on x's device, or None when autocast is off. The
    meta device has no autocast (torch raises on asking), and a meta forward is how shapes are worked out."""
    device = x.device.type
    if device == "meta":
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def cast_for_autocast(amp: torch.dtype, tensors):
    """float32 tensors cast to `amp` (differentiably), as autocast casts nn.Linear's and nn.Conv2d's operands."""
    return [t.to(amp) if t is not None and t.dtype == torch.float32 else t for t in tensors]


def run_in_autocast_dtype(amp: torch.dtype, fn, tensors: list):
    """fn(*tensors) with the float32 tensors cast to autocast's dtype `amp` and autocast off inside.

    Under autocast the ops compute in its dtype, as nn.Linear's matmul and nn.Conv2d do: the casts happen here,
    where autograd records them (float32 gradients for float32 parameters), and the planned Functions run with
    autocast off. Left on, it cast some products inside them and not others, and their backward (which runs
    outside autocast) met mixed dtypes: every training step failed (found 2026-12-02)."""
    tensors = cast_for_autocast(amp, tensors)
    with torch.autocast(tensors[0].device.type, enabled=False):
        return fn(*tensors)


def grads_of_rerun(rerun, inputs: tuple, needs: list[bool], dy: torch.Tensor) -> list:
    """A backward for create_graph=True (gradient penalties, MAML): the gradients of `rerun()` (the forward run
    again on `inputs` with autograd on) for the inputs whose entry in `needs` is true, None for the others,
    themselves differentiable. A planned backward runs on detached operands and saved intermediates, which are
    constants to autograd, so a gradient of its result would silently lose terms; this one is exact to any order,
    and slower."""
    leaves = [t for t, need in zip(inputs, needs, strict=True) if need]
    if not leaves:
        return [None] * len(inputs)
    grads = iter(torch.autograd.grad(rerun(), leaves, dy, create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needs]


def refuse_jit_trace(where: str) -> None:
    """Raise under torch.jit.trace. The planner's Python (plan lookups, the first call's timings on random
    tensors) ran inside the trace and met sizes traced as tensors: the trace failed deep inside a timing
    ("manual_seed expected a long"), or recorded a timing's ops and failed its sanity check, depending on what was
    already cached. TorchScript is in maintenance mode; torch.export captures these layers (dynamic batch too)."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            f"{where}: torch.jit.trace is not supported; export the model with torch.export.export(model, (x,)) "
            "(a dynamic batch works: dynamic_shapes), or compile it with torch.compile; for ONNX, "
            "torch.onnx.export(model, (x,), dynamo=True) exports through torch.export"
        )


def refuse_jit_script(where: str) -> None:
    """What torch.jit.script meets (through the layers' __prepare_scriptable__ hook) instead of failing to compile
    the planner's Python with "Cannot create dict for key type 'tuple'"."""
    raise RuntimeError(
        f"{where}: torch.jit.script is not supported (the layer plans its contraction in Python); export the "
        "model with torch.export.export(model, (x,)), or compile it with torch.compile"
    )

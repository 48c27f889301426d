"""A layer's call memo: what the full path decided for a call on an input of a given shape.

At one row, a low-rank MPOLinear's two GEMMs take ~5 us on one CPU thread, and finding out that they are what to
run took ~12 us more: the backend, the plan-cache key and lookup, the route, the views of the cores. TuckerConv2d
at batch 1 spent 40-50 us of a 90-140 us call the same way (argument checks, conv parameters, plan key, weight
views). The answer depends only on the input's shape, dtype and device, whether the call needs autograd, the
layer's parameters and the planner's state, so a layer that has answered once for an input shape keeps the answer
and checks those facts on each call instead: that the parameters are the same tensors on the same storage (not
replaced, not re-pointed by `.data =` or `.to()`) and that no plan or option changed since (`plan_generation`).
Any mismatch falls back to the full path, which also re-validates the call. What is kept must stay right under
in-place updates of the parameters (an optimizer step, `copy_`): views of them, or plan facts, never values
computed from them.

A training call keeps the same planned autograd.Function; the memo only skips deciding that it is the one to run
(TuckerConv2d's training step at batch 1, 512 channels, ranks 7: ~195 -> ~180 us, where autograd through the same
three convolutions takes ~160). Neither layer uses the memo under torch.compile (dynamo would break the graph on
data_ptr) or under a torch.func transform (memo_applies).
"""

from __future__ import annotations

import torch

from ..ops.modes import autocast_dtype, under_transform_or_dual
from ..plan.cache import plan_generation

# Distinct input shapes remembered per layer; past this the memo starts over (a layer fed ever-new shapes, e.g.
# growing prompts without a cache, must not accumulate entries).
MAX_ENTRIES = 32


class CallMemo:
    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, x: torch.Tensor, params: tuple[torch.Tensor, ...], mode: object) -> tuple[bool, object]:
        """(True, what was remembered) while it still holds for this input, these parameters and this mode (e.g.
        whether the call needs autograd), else (False, None)."""
        entry = self._entries.get((x.shape, x.dtype, x.device, mode))
        if entry is None:
            return False, None
        tensors, ptrs, generation, payload = entry
        if generation != plan_generation() or len(params) != len(tensors):
            return False, None
        for now, then, ptr in zip(params, tensors, ptrs):
            if now is not then or now.data_ptr() != ptr:
                return False, None
        return True, payload

    def put(
        self, x: torch.Tensor, params: tuple[torch.Tensor, ...], mode: object, payload: object, generation: int
    ) -> None:
        """Remember `payload` for inputs like x, valid while `params` stay the same tensors on the same storage and
        the plan generation is `generation`: plan_generation() read *before* the payload was derived. Read after,
        a recalibration or option change made by another thread while this one derived it would stamp a payload
        derived from the old state as current, and the layer would keep it until the next change."""
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        ptrs = tuple(p.data_ptr() for p in params)
        self._entries[(x.shape, x.dtype, x.device, mode)] = (tuple(params), ptrs, generation, payload)


def memo_applies(x: torch.Tensor) -> bool:
    """Whether a layer call on x may use its memo: not while torch.compile traces (dynamo would break the graph on
    data_ptr), not under torch.jit.trace, not under a torch.func transform (the remembered routes run the planned
    Functions) and not under autocast (the full path casts the operands to autocast's dtype first)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # jit.trace: the full path refuses it (modes.py)
        return False
    return not (under_transform_or_dual() or autocast_dtype(x) is not None)


def memo_of(module: torch.nn.Module) -> CallMemo:
    """The module's memo, built on first use rather than in __init__ (so layers unpickled from older versions have
    one too). It lives outside the module's state: the layers drop it in __getstate__ and _apply."""
    memo = module.__dict__.get("_memo")
    if memo is None:
        memo = module.__dict__["_memo"] = CallMemo()
    return memo


class MemoizedCalls:
    """Mixin for the layers: `self._memo_for_calls`, kept out of the layer's state and dropped whenever .to(),
    .half(), .cuda() and the like re-point or replace the parameters (the memo's views would otherwise keep the old
    storage alive)."""

    @property
    def _memo_for_calls(self) -> CallMemo:
        return memo_of(self)

    def _apply(self, fn, recurse=True):
        memo_of(self).clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_memo", None)  # rebuilt on the next call, never pickled
        return state

"""MPOLinear's inference memo: which route a no-grad call on an input of a given shape takes, remembered per layer.

At one row, a low-rank layer's two GEMMs take ~5 us on one CPU thread, and finding out that they are what to run
took ~12 us more: the backend, the plan-cache key and lookup, the route, the views of the cores. Under no_grad the
answer depends only on the input's shape, dtype and device, the cores themselves and the planner's state, so a
layer that has answered once for an input shape keeps the answer and checks those facts on each call instead:
that the cores are the same tensors on the same storage (not replaced, not re-pointed by `.data =` or `.to()`)
and that no plan or option changed since (`plan_generation`). Any mismatch falls back to the full path, which
also re-validates the call. Training calls never use the memo (autograd needs the planned Function), nor does
torch.compile (the caller checks): dynamo would break the graph on data_ptr.
"""

from __future__ import annotations

import torch

from ..ops import low_rank_apply, low_rank_inference_factors
from ..plan.cache import plan_generation

# Distinct input shapes remembered per layer; past this the memo starts over (a layer fed ever-new shapes, e.g.
# growing prompts without a cache, must not accumulate entries).
MAX_ENTRIES = 32


class InferenceMemo:
    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def run(self, x: torch.Tensor, params: dict, bias: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """(y, True) when the memo knows this call's route and it is the low-rank one; (None, True) when it knows
        the call takes another route; (None, False) when it does not know (call `learn` on the full path)."""
        entry = self._entries.get((x.shape, x.dtype, x.device))
        if entry is None:
            return None, False
        g1, g2, ptr1, ptr2, generation, a, b = entry
        if (
            params["0"] is not g1
            or params["1"] is not g2
            or g1.data_ptr() != ptr1
            or g2.data_ptr() != ptr2
            or generation != plan_generation()
        ):
            return None, False
        if a is None:
            return None, True
        if x.dim() == 2:
            return low_rank_apply(x, a, b, bias), True
        y = low_rank_apply(x.reshape(-1, x.shape[-1]), a, b, bias)
        return y.view(*x.shape[:-1], b.shape[1]), True

    def learn(self, x: torch.Tensor, cores: list[torch.Tensor], backend: str) -> None:
        """Remember the route of a validated no-grad call (before or after running it on the full path)."""
        if len(cores) != 2:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        factors = low_rank_inference_factors(x, cores, backend)
        a, b = factors if factors is not None else (None, None)
        g1, g2 = cores
        self._entries[(x.shape, x.dtype, x.device)] = (g1, g2, g1.data_ptr(), g2.data_ptr(), plan_generation(), a, b)

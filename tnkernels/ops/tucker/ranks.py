"""Which Tucker ranks a compression ratio gets: on a CPU, the rank pair whose convolutions run fastest here.

At a given ratio many rank pairs (R_out, R_in) keep about the same number of parameters and the same error, and
the planner's cost model prices them alike (same FLOPs). The CPU's convolution kernels do not: on the EPYC VM
(oneDNN, 2026-12-02) the 3x3 core of ResNet-34's 64-channel conv at ratio 2 ran at half the rate with the default
ranks (38, 38) as with (48, 28), and a training step of the three convolutions took 0.82-1.24x of nn.Conv2d's time
against 1.30-1.70x (`python bench/tucker_rank_ab.py`). So with `prefer="speed"` (opt-in) a conversion on a CPU
chooses among the candidates of `decompose.tucker_rank_candidates` (error bound within 5% of the default pair's) by
the time of a training step of their three convolutions, on a probe input of about the activations of ResNet's
64-channel stage at 28x28, interleaved over three rounds. The timings depend on the shape only: they are measured
once per machine and conv shape for every pair of the budget's frontier (`tucker_rank_frontier`) and kept under
$TNK_CACHE_DIR (per CPU model, thread count and torch version), so a conversion gives the same ranks on this
machine every time; another machine may choose others. Another pair replaces the default only if it is at least
15% faster, and then the most accurate pair within 10% of the fastest is taken. Elsewhere (a GPU,
`TNK_TUCKER_TUNE=0`, or `prefer="accuracy"`) the default pair stays.
"""

from __future__ import annotations

import math
import threading

import torch

from ...decompose import tucker_rank_candidates, tucker_rank_frontier, tucker_ranks_for_ratio
from ...plan.calibrate import MachineStore
from .tuned import interleaved_seconds, kind_is_timed

PROBE_ACTIVATIONS = 64 * 28 * 28  # the probe input's C x H x W
# Ranks change the model, not only its speed: another pair replaces the default only when it is clearly faster
# (15%, beyond this VM's timing noise), and then the most accurate pair within 10% of the fastest is taken.
_RANK_MARGIN = 0.85
_NEAR = 1.10
_LOCK = threading.Lock()
_MEMO: dict[str, dict] = {}
_STORE = MachineStore("tucker_ranks-v2.json")


def choose_tucker_ranks(weight: torch.Tensor, ratio: float, conv: tuple, prefer: str = "accuracy") -> tuple[int, int]:
    """The ranks (R_out, R_in) a conv kernel `weight` gets at `ratio`; `conv` = (stride, padding, dilation)."""
    if prefer not in ("speed", "accuracy"):
        raise ValueError(f"prefer must be 'speed' or 'accuracy', got {prefer!r}")
    if prefer == "accuracy" or not kind_is_timed(weight.device):
        return tucker_ranks_for_ratio(tuple(weight.shape), ratio)
    candidates = tucker_rank_candidates(weight, ratio)
    if len(candidates) == 1:
        return candidates[0]
    seconds = frontier_seconds(tuple(weight.shape), ratio, conv, weight.dtype)
    return pick(candidates, {pair: seconds[pair] for pair in candidates})


def frontier_seconds(shape: tuple, ratio: float, conv: tuple, dtype: torch.dtype) -> dict[tuple[int, int], float]:
    """Seconds of a training step of the three convolutions for every pair of tucker_rank_frontier(shape, ratio),
    measured once per machine and shape and kept (every kernel of the shape shares them)."""
    frontier = tucker_rank_frontier(shape, ratio)
    key = f"{shape}|{ratio}|{conv}|{dtype}"
    names = {f"{r}x{c}" for r, c in frontier}

    def valid(found) -> bool:  # a damaged or foreign entry is measured again, never indexed
        return (
            isinstance(found, dict)
            and set(found) == names
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in found.values())
        )

    with _LOCK:
        found = _MEMO.get(key)
        if found is None:
            found = _STORE.get_or_measure(
                key,
                lambda: {f"{r}x{c}": t for (r, c), t in _measure(shape, conv, frontier, dtype).items()},
                valid=valid,
            )
        _MEMO[key] = found
    return {tuple(int(v) for v in name.split("x")): t for name, t in found.items()}


def pick(candidates: list[tuple[int, int]], seconds: dict) -> tuple[int, int]:
    """The choice from measured `seconds` per pair (candidates: the default first, then by error bound)."""
    fastest = min(seconds.values())
    if fastest > _RANK_MARGIN * seconds[candidates[0]]:
        return candidates[0]
    # the most accurate of the pairs about as fast as the fastest: noise between near-equal timings cannot flip
    # the choice to a less accurate pair
    return next(pair for pair in candidates if seconds[pair] <= _NEAR * fastest)


def _measure(shape: tuple, conv: tuple, pairs: list[tuple[int, int]], dtype: torch.dtype) -> dict:
    from .torch_impl import TuckerConvFunction

    c_out, c_in, kh, kw = shape
    (sh, sw), (ph, pw), (dh, dw) = conv
    side = max(kh * dh, kw * dw, round(math.sqrt(PROBE_ACTIVATIONS / c_in)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c_in, side, side, generator=g, dtype=dtype, requires_grad=True)
    oh, ow = (side + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (side + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    dy = torch.randn(1, c_out, oh, ow, generator=g, dtype=dtype)
    factors = {}
    for r_out, r_in in pairs:
        shapes = ((c_in, r_in), (r_out, r_in, kh, kw), (c_out, r_out))
        factors[(r_out, r_in)] = [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]

    def step(pair: tuple[int, int]) -> None:
        u_in, core, u_out = factors[pair]
        with torch.enable_grad():
            TuckerConvFunction.apply(x, u_in, core, u_out, None, "three-convs", conv, False).backward(dy)

    return interleaved_seconds(pairs, step)


def forget() -> None:
    """Drop this machine's measured rank choices (memory and disk)."""
    with _LOCK:
        _MEMO.clear()
        _STORE.drop()

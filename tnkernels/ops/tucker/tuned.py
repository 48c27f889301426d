"""Which Tucker plan kind runs on a CPU: the cost model's candidates timed on this machine, once per shape.

The cost model prices a convolution from GEMM rates and one measured scale per kernel class, and that is not
enough to order the kinds where they are close. On the EPYC VM (2026-12-02) oneDNN ran a 3x3 convolution on 38
channels at half the rate of one on 48, and two threads sped up the dense convolution far more than three small
ones: ResNet-34's 64-channel conv at Tucker ranks 38, batch 8, training, two threads: three convolutions 43.8
ms, the factors folded into the core (`fold-in`) 24.6, the rebuilt dense weight 21.4, nn.Conv2d 29.4; at batch 1
the three convolutions were 1.3x slower than nn.Conv2d. The model picked the three convolutions at every point
of the grid.

So on a CPU the first call of a shape times the kinds the model predicts within 3x of its pick, on random
tensors of the layer's shapes (the batch capped at 8, assuming every kind's time grows about linearly with the
batch past it: a large batch would make the timing slow), forward alone or forward and backward as the call
needs, interleaved over three rounds; the fastest wins if it is 5% faster than the model's pick. The choice is
kept in memory and under $TNK_CACHE_DIR per CPU model, thread count and torch version: 0.1-1.5 s once per layer
shape and machine. On a noisy machine a choice can still be wrong (`forget()` measures again).
`TNK_TUCKER_TUNE=0` keeps the model's pick (the tests set it, so that what they check does not depend on the
machine); `tnkernels.plan.options(tucker_force=...)` overrides both.
"""

from __future__ import annotations

import os
import threading

import torch

from ...plan.cache import OPTIONS, tucker_decision
from ...plan.calibrate import MachineStore, _timeit, outside_transforms
from ...plan.tucker import TUCKER_KINDS

MAX_BATCH = 8  # shapes are timed at this batch at most
_WITHIN = 3.0  # kinds predicted more than this many times slower than the model's pick are not timed
_MARGIN = 0.95  # another kind must be this much faster than the model's pick to replace it
_LOCK = threading.Lock()
_MEMO: dict[tuple, str] = {}


def kind_is_timed(device: torch.device) -> bool:
    """Whether kind_for times the kinds on this device (a CPU, no override) rather than taking the model's pick."""
    return device.type == "cpu" and OPTIONS.tucker_force is None and os.environ.get("TNK_TUCKER_TUNE") != "0"


# v2: folded kernels are contiguous since 2026-12-02 (they were channels-last before, which
# changed their timings); choices measured before are not reused
_STORE = MachineStore("tucker_kinds-v2.json")


@torch.compiler.assume_constant_result  # under torch.compile: chosen (and timed) at trace time, as in eager
def kind_for(shapes: tuple, conv: tuple, dtype: torch.dtype, device: torch.device, needs_grad: bool) -> str:
    """The plan kind to run: the cost model's pick, or on a CPU the fastest measured candidate."""
    if not kind_is_timed(device):
        return tucker_decision(shapes, conv, dtype, device, needs_grad).kind
    (n, *rest), *factor_shapes = shapes
    timed_shapes = ((min(n, MAX_BATCH), *rest), *factor_shapes)
    # the per-call lookup hashes a tuple: formatting the disk key costs ~4 us, a tenth of a small conv's call
    memo_key = (torch.get_num_threads(), timed_shapes, conv, dtype, needs_grad)
    found = _MEMO.get(memo_key)
    if found is not None:
        return found
    key = f"{timed_shapes}|{conv}|{dtype}|{'grad' if needs_grad else 'fwd'}"
    with _LOCK:
        found = _MEMO.get(memo_key)
        if found is None:  # a new process: stored by an earlier one (a kind this version knows)
            stored = _STORE.load().get(key)
            found = stored if isinstance(stored, str) and stored in TUCKER_KINDS else None
        if found is None:
            dec = tucker_decision(shapes, conv, dtype, device, needs_grad)
            predicted = dict(dec.alternatives)  # forward seconds per kind
            candidates = [k for k, seconds in predicted.items() if seconds <= _WITHIN * predicted[dec.kind]]
            # A stored kind this version does not know (a cache written by another version, a damaged file) is
            # measured again: it used to reach the executor and fail every call with a KeyError.
            found = _STORE.get_or_measure(
                key,
                # outside any torch.func transform the first call may be made in (random tensors, a backward)
                lambda: outside_transforms(measure, timed_shapes, conv, dtype, needs_grad, candidates, dec.kind),
                valid=lambda kind: kind in TUCKER_KINDS,
            )
        _MEMO[memo_key] = found
        return found


def measure(shapes: tuple, conv: tuple, dtype: torch.dtype, needs_grad: bool, kinds: list[str], pick: str) -> str:
    """Time `kinds` on random tensors of `shapes`; the fastest if it beats `pick` by the margin, else `pick`."""
    from .torch_impl import TuckerConvFunction, _run, _weights

    x_shape, u_in_shape, core_shape, u_out_shape = shapes
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g, dtype=dtype) for s in (x_shape, u_in_shape, core_shape, u_out_shape)]
    if needs_grad:
        tensors = [t.requires_grad_() for t in tensors]

    upstream = {}  # a dense gradient, as a layer inside a network gets (y.sum() would hand it a stride-0 one)

    def call(kind: str):
        x, u_in, core, u_out = tensors
        if not needs_grad:
            with torch.no_grad():
                weights, spatial, _ = _weights(kind, u_in, core, u_out)
                return _run(x, weights, spatial, None, *conv, keep=False)[0]
        for t in tensors:
            t.grad = None
        with torch.enable_grad():
            y = TuckerConvFunction.apply(x, u_in, core, u_out, None, kind, conv, False)
            if "dy" not in upstream:
                upstream["dy"] = torch.randn(y.shape, generator=g, dtype=dtype)
            y.backward(upstream["dy"])

    best = interleaved_seconds(kinds, call)
    fastest = min(best, key=best.get)
    return fastest if pick not in best or best[fastest] < _MARGIN * best[pick] else pick


def interleaved_seconds(keys: list, call, rounds: int = 3) -> dict:
    """The fastest call(key) in seconds for each key on the CPU, over `rounds` interleaved rounds: a burst of load
    spoils one round of every key alike, not one key (also used by ranks.py)."""
    best = dict.fromkeys(keys, float("inf"))
    cpu = torch.device("cpu")
    for _ in range(rounds):
        for key in keys:
            seconds = _timeit(lambda k=key: call(k), cpu, budget_s=0.02, min_calls=3, max_calls=10)
            best[key] = min(best[key], seconds)
    return best


def forget() -> None:
    """Drop this machine's measured choices (memory and disk): they are measured again as layers need them."""
    with _LOCK:
        _MEMO.clear()
        _STORE.drop()

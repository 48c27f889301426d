"""The cost model shared by every planner: one contraction step's FLOPs, bytes and launches -> predicted
seconds."""

from __future__ import annotations

from dataclasses import dataclass

from .calibrate import Calibration


@dataclass(frozen=True)
class Step:
    """One torch call (or a few fused ones) of a plan, with what it costs.

    `what` reads like the math, e.g. "state[64·1, 1·40, 40] <- G1[40, 40·8]"; `mindim` is the smallest GEMM
    dimension, which sets the rate the calibration predicts; `ops` counts torch calls (each pays the
    overhead).
    """

    what: str
    flops: float
    bytes: float
    mindim: int
    ops: int = 1
    seconds: float = 0.0


def price(
    cal: Calibration,
    what: str,
    flops: float,
    nbytes: float,
    gemm: int | tuple[int, int, int],
    ops: int = 1,
    fresh: tuple[float, ...] = (),
    permuted: float = 0.0,
    batched: bool = False,
    rate_scale: float = 1.0,
) -> Step:
    """A Step with its predicted time: overhead per call, the roofline max of compute time and memory time, the
    first-touch cost of the fresh tensors it allocates (`fresh`: their sizes in bytes), and the strided copies
    it makes (`permuted`: bytes read plus written by copies that permute dimensions; not part of `nbytes`).
    `gemm`: the step's GEMM as (M, K, N), or just its smallest dimension (priced as a small K).
    `batched`: the step is a broadcast batched matmul of many small products, priced at the batched rate.
    `rate_scale`: a factor on that rate (a convolution's, Calibration.conv_rate_scale)."""
    mindim = max(1, min(gemm)) if isinstance(gemm, tuple) else max(1, int(gemm))
    if batched:
        rate = cal.batched_rate(mindim)
    elif isinstance(gemm, tuple):
        rate = cal.gemm_rate(*gemm)
    else:
        rate = cal.rate(mindim)
    compute = flops / (rate * rate_scale) if flops else 0.0
    memory = cal.memory_seconds(nbytes)
    seconds = ops * cal.overhead_s + max(compute, memory) + cal.permute_seconds(permuted) + cal.fresh_seconds(fresh)
    return Step(what, float(flops), float(nbytes), int(mindim), ops, seconds)


def total(steps: list[Step] | tuple[Step, ...]) -> tuple[float, float, float]:
    """(flops, bytes, seconds) summed over steps."""
    return (sum(s.flops for s in steps), sum(s.bytes for s in steps), sum(s.seconds for s in steps))


def roofline_seconds(cal: Calibration, flops: float, nbytes: float) -> float:
    """Ideal time of a whole computation at peak rate and full bandwidth (no overheads, no thin-GEMM
    penalty)."""
    return max(flops / cal.peak, nbytes / cal.bandwidth)

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


def price(cal: Calibration, what: str, flops: float, nbytes: float, mindim: int, ops: int = 1) -> Step:
    """A Step with its predicted time: overhead per call plus the roofline max of compute time and memory
    time."""
    compute = flops / cal.rate(max(1, mindim)) if flops else 0.0
    memory = nbytes / cal.bandwidth
    return Step(
        what, float(flops), float(nbytes), int(mindim), ops, ops * cal.overhead_s + max(compute, memory)
    )


def total(steps: list[Step] | tuple[Step, ...]) -> tuple[float, float, float]:
    """(flops, bytes, seconds) summed over steps."""
    return (sum(s.flops for s in steps), sum(s.bytes for s in steps), sum(s.seconds for s in steps))


def roofline_seconds(cal: Calibration, flops: float, nbytes: float) -> float:
    """Ideal time of a whole computation at peak rate and full bandwidth (no overheads, no thin-GEMM
    penalty)."""
    return max(flops / cal.peak, nbytes / cal.bandwidth)

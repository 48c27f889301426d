"""Plans for the Tucker-2 convolution: three convolutions, or fold a factor (or both) into the core first.

    three-convs: 1x1 (C_in -> R_in) at the input size, kh x kw (R_in -> R_out), 1x1 (R_out -> C_out)
    fold-in:     core' = core x U_in  [R_out, C_in, kh, kw]; kh x kw (C_in -> R_out), 1x1 (R_out -> C_out)
    fold-out:    core' = U_out x core [C_out, R_in, kh, kw]; 1x1 (C_in -> R_in), kh x kw (R_in -> C_out)
    dense:       W = U_out x core x U_in; one kh x kw convolution (C_in -> C_out)

Folding costs a small weight-sized einsum and removes a pass over the activations; it wins when a rank is
close
to its channel count or the batch is small. A convolution is priced as the implicit GEMM it is:
M = N*H_out*W_out, K = C_in*kh*kw, N = C_out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .calibrate import Calibration
from .cost import Step, price, total

TUCKER_KINDS = ("three-convs", "fold-in", "fold-out", "dense")


@dataclass(frozen=True)
class TuckerDecision:
    kind: str
    steps: tuple[Step, ...]
    fwd_seconds: float
    bwd_seconds: float
    dense_seconds: float
    alternatives: tuple[tuple[str, float], ...] = field(default=())

    @property
    def flops(self) -> float:
        return total(self.steps)[0]

    @property
    def bytes(self) -> float:
        return total(self.steps)[1]


def out_size(h: int, k: int, s: int, p: int, d: int) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def _conv(
    cal: Calibration,
    what: str,
    n: int,
    ci: int,
    h: int,
    w: int,
    co: int,
    kh: int,
    kw: int,
    ho: int,
    wo: int,
    isz: int,
    backward: bool,
) -> Step:
    m, k = n * ho * wo, ci * kh * kw
    mult = 2 if backward else 1  # backward: gradient of the input and of the weight, each as costly as the forward
    return price(
        cal,
        f"{'d ' if backward else ''}{what}: conv {ci}->{co} {kh}x{kw} at {ho}x{wo}",
        mult * 2 * m * k * co,
        mult * isz * (n * ci * h * w + co * k + m * co),
        (m, k, co),
        ops=mult,
        fresh=(isz * m * co,),  # the output
        rate_scale=cal.conv_rate_scale(kh * kw),
    )


def _fold(cal: Calibration, what: str, a: int, b: int, c: int, isz: int, backward: bool) -> Step:
    """A weight-sized contraction [a, b] @ [b, c] (a fold); its backward is two of them."""
    mult = 2 if backward else 1
    return price(
        cal,
        f"{'d ' if backward else ''}fold {what}: [{a}, {b}] @ [{b}, {c}]",
        mult * 2 * a * b * c,
        mult * isz * (a * b + b * c + a * c),
        (a, b, c),
        ops=mult,
    )


def tucker_steps(cal: Calibration, kind: str, shapes: tuple, conv: tuple, isz: int, backward: bool) -> list[Step]:
    (n, c_in, h, w), (_, r_in), (r_out, _, kh, kw), (c_out, _) = shapes
    (sh, sw), (ph, pw), (dh, dw) = conv
    ho, wo = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    ks = kh * kw
    if kind == "three-convs":
        steps = [
            _conv(cal, "project in", n, c_in, h, w, r_in, 1, 1, h, w, isz, backward),
            _conv(cal, "core", n, r_in, h, w, r_out, kh, kw, ho, wo, isz, backward),
            _conv(cal, "project out", n, r_out, ho, wo, c_out, 1, 1, ho, wo, isz, backward),
        ]
    elif kind == "fold-in":
        steps = [
            _fold(cal, "U_in into core", r_out * ks, r_in, c_in, isz, backward),
            _conv(cal, "folded core", n, c_in, h, w, r_out, kh, kw, ho, wo, isz, backward),
            _conv(cal, "project out", n, r_out, ho, wo, c_out, 1, 1, ho, wo, isz, backward),
        ]
    elif kind == "fold-out":
        steps = [
            _fold(cal, "U_out into core", c_out, r_out, r_in * ks, isz, backward),
            _conv(cal, "project in", n, c_in, h, w, r_in, 1, 1, h, w, isz, backward),
            _conv(cal, "folded core", n, r_in, h, w, c_out, kh, kw, ho, wo, isz, backward),
        ]
    elif kind == "dense":
        steps = [
            _fold(cal, "U_out into core", c_out, r_out, r_in * ks, isz, backward),
            _fold(cal, "U_in into core", c_out * ks, r_in, c_in, isz, backward),
            _conv(cal, "dense", n, c_in, h, w, c_out, kh, kw, ho, wo, isz, backward),
        ]
    else:
        raise ValueError(f"plan: unknown Tucker plan kind {kind!r}; choose one of {', '.join(TUCKER_KINDS)}")
    return steps


def decide_tucker(
    cal: Calibration, shapes: tuple, conv: tuple, isz: int, *, needs_grad: bool, force: str | None = None
) -> TuckerDecision:
    """Pick the kind with the least predicted time for the pass(es) that will run."""
    if force is not None and force not in TUCKER_KINDS:
        raise ValueError(f"plan: tucker force must be one of {', '.join(TUCKER_KINDS)} or None, got {force!r}")
    scored = []
    for kind in TUCKER_KINDS:
        fwd = total(tucker_steps(cal, kind, shapes, conv, isz, False))[2]
        bwd = total(tucker_steps(cal, kind, shapes, conv, isz, True))[2] if needs_grad else 0.0
        scored.append((fwd + bwd, kind, fwd, bwd))
    scored.sort()
    alternatives = tuple((k, f) for _, k, f, _ in scored)
    pick = next(s for s in scored if force is None or s[1] == force)
    _, kind, fwd, bwd = pick
    (n, c_in, h, w), _, (_, _, kh, kw), (c_out, _) = shapes
    (sh, sw), (ph, pw), (dh, dw) = conv
    ho, wo = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    dense = _conv(cal, "dense", n, c_in, h, w, c_out, kh, kw, ho, wo, isz, False).seconds
    return TuckerDecision(kind, tuple(tucker_steps(cal, kind, shapes, conv, isz, False)), fwd, bwd, dense, alternatives)

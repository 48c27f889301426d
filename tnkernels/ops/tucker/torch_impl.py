"""Torch backend for the Tucker-2 convolution: the planner picks three convolutions or folds factors into the
core.

One autograd.Function runs the chosen sequence of convolutions. Its backward runs its own contractions: per conv,
one `aten.convolution_backward` for the input and weight gradients together (the kernel autograd would call), then
the weight-sized einsums that undo the folding. Intermediate activations are saved, or recomputed under
`tnkernels.plan.options(recompute=True)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...plan.cache import OPTIONS, planned_size
from ..grad_layout import in_layout_of
from ..modes import grads_of_rerun, needs_autograd, under_transform_or_dual
from .tuned import kind_for


def is_available() -> tuple[bool, str]:
    return True, ""


def _planned_input_shape(x: torch.Tensor, channels: int) -> tuple[int, int, int, int]:
    """x's shape as the plan sees it: itself in eager mode; under torch.compile each dynamic-able size bucketed,
    under torch.export the batch planned at 8 (plan/cache.py: planned_size). Spatial sizes keep their bucket
    under export too: exporting with a dynamic height or width is not supported (the bucket's guard narrows it).
    `channels` is u_in's (the caller checked that x has as many): x's own is symbolic under dynamic=True."""
    n, _, h, w = x.shape
    return (planned_size(n, 8), channels, planned_size(h, None), planned_size(w, None))


def _traced_int(d) -> int:
    """A size as a plain int while dynamo traces, where a symbolic size passes for an int (isinstance too) but is
    no constant: found by comparisons, each a guard on it, so it is specialized (another value recompiles)."""
    lo, hi = 0, 1
    while d >= hi:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # lo <= d < hi
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if d >= mid else (lo, mid)
    return lo


def _plan_shapes(x: torch.Tensor, u_in: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor) -> tuple:
    """The shapes a call's plan is looked up for (kind_for, a constant to dynamo): plain ints only. Under
    torch.compile(dynamic=True) x's sizes are symbolic (bucketed, or the channels taken from u_in), and so are the
    factors' in the functional op (a layer's parameters keep static shapes): specialized."""
    factors = (tuple(u_in.shape), tuple(core.shape), tuple(u_out.shape))
    if torch.compiler.is_compiling():
        factors = tuple(tuple(_traced_int(d) for d in shape) for shape in factors)
    return (_planned_input_shape(x, factors[0][0]), *factors)


# Which of a kind's convolutions carries the spatial kernel (the others are 1x1)
_SPATIAL = {"three-convs": 1, "fold-in": 0, "fold-out": 1, "dense": 0}


def _weights(kind: str, u_in: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor):
    """The conv weights of a plan kind, in order, and which of them carries the spatial kernel (index).

    Folded kernels are made contiguous, as nn.Conv2d's weight is: einsum returns "rsyx,is->riyx" with the input
    channel innermost (channels-last strides), and a convolution with a channels-last weight returns a
    channels-last output even for an NCHW input, which nn.Conv2d never does (a caller's .view() of the output
    would fail). With a contiguous weight the output takes the input's format, as nn.Conv2d's does. The copy is
    weight-sized, small beside the einsum that folds it."""
    # [R_in, C_in, 1, 1] and [C_out, R_out, 1, 1] as views: a contiguous copy does not make the CPU convolution
    # faster (re-measured 2026-12-01, forward and backward of the 1x1 convs, within a few percent either way)
    w_in = u_in.t()[:, :, None, None]
    w_out = u_out[:, :, None, None]
    if kind == "three-convs":
        return [w_in, core, w_out], _SPATIAL[kind], None
    # A core made channels-last (model.to(memory_format=torch.channels_last)) gives a channels-last folded kernel,
    # as nn.Conv2d's weight would be after the same call, so the output layout follows nn.Conv2d's there too.
    fmt = torch.contiguous_format if core.is_contiguous() else _weight_format(core)
    if kind == "fold-in":
        return [torch.einsum("rsyx,is->riyx", core, u_in).contiguous(memory_format=fmt), w_out], _SPATIAL[kind], None
    if kind == "fold-out":
        return [w_in, torch.einsum("or,rsyx->osyx", u_out, core).contiguous(memory_format=fmt)], _SPATIAL[kind], None
    t = torch.einsum("or,rsyx->osyx", u_out, core)  # dense: fold U_out, then U_in
    return [torch.einsum("osyx,is->oiyx", t, u_in).contiguous(memory_format=fmt)], _SPATIAL[kind], t


def _weight_format(core: torch.Tensor) -> torch.memory_format:
    channels_last = core.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


# Weight-sized contractions of the folded kinds' backward as single GEMMs on reshapes (two with no copy at all):
# einsum took them through permuted copies and batched products. ResNet-34's 64-channel shapes, ranks 38, EPYC VM,
# two threads (2026-12-02): pairing over the kernel 71 -> 28 us, over the outer channel and kernel 80 -> 47,
# the U_out unfold 33 -> 27.
def _pair_spatial(d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[P, Q] = sum over (s, y, x) of d[P, s, y, x] b[Q, s, y, x]."""
    return d.reshape(d.shape[0], -1) @ b.reshape(b.shape[0], -1).t()


def _unfold_out(u_out: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """[R, s, y, x] = sum over o of u_out[o, R] d[o, s, y, x]."""
    return (u_out.t() @ d.reshape(d.shape[0], -1)).view(u_out.shape[1], *d.shape[1:])


def _pair_in(d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[i, s] = sum over (a, y, x) of d[a, i, y, x] b[a, s, y, x]: one GEMM over (a, y, x) after two small copies."""
    d_t = d.transpose(0, 1).reshape(d.shape[1], -1)
    b_t = b.transpose(0, 1).reshape(b.shape[1], -1)
    return d_t @ b_t.t()


def _run(x, weights, spatial: int, bias, stride, padding, dilation, keep: bool):
    h = x
    inputs = []
    for k, w in enumerate(weights):
        if keep:
            inputs.append(h)
        last = k == len(weights) - 1
        if k == spatial:
            h = F.conv2d(h, w, bias if last else None, stride, padding, dilation)
        else:
            h = F.conv2d(h, w, bias if last else None)
    return h, inputs


class TuckerConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u_in, core, u_out, bias, kind: str, conv: tuple, recompute: bool):
        stride, padding, dilation = conv
        weights, spatial, t = _weights(kind, u_in, core, u_out)
        y, inputs = _run(x, weights, spatial, bias, stride, padding, dilation, keep=not recompute)
        ctx.kind, ctx.conv, ctx.spatial, ctx.recompute = kind, conv, spatial, recompute
        ctx.has_bias = bias is not None
        extra = [] if recompute else inputs[1:]
        ctx.save_for_backward(x, u_in, core, u_out, *weights, *([t] if t is not None else []), *extra)
        ctx.n_weights = len(weights)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u_in, core, u_out, *rest = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        kind, spatial = ctx.kind, ctx.spatial
        if torch.is_grad_enabled():  # create_graph=True (gradient penalties, MAML): see _differentiable_backward
            return _differentiable_backward(ctx, dy, x, u_in, core, u_out)
        weights = rest[: ctx.n_weights]
        rest = rest[ctx.n_weights :]
        t = None
        if kind == "dense":
            t, rest = rest[0], rest[1:]
        if ctx.recompute:
            with torch.no_grad():
                _, inputs = _run(x, weights, spatial, None, stride, padding, dilation, keep=True)
        else:
            inputs = [x, *rest]
        need_x = ctx.needs_input_grad[0]
        need_w = any(ctx.needs_input_grad[1:4])
        d = dy
        d_weights: list[torch.Tensor | None] = [None] * len(weights)
        for k in reversed(range(len(weights))):
            conv_args = (stride, padding, dilation) if k == spatial else ((1, 1), (0, 0), (1, 1))
            want_input = k > 0 or need_x
            # One call for both gradients of this conv, as autograd makes it: the kernels share their work (the
            # unfolded input, the zeroed buffers); torch.nn.grad's conv2d_input / conv2d_weight would each redo it
            # (ResNet-34's 64-channel stage, batch 8, ratio 64, forward + backward: 6.8 ms with the two calls).
            d_in, d_weights[k], _ = torch.ops.aten.convolution_backward(
                d, inputs[k], weights[k], None, *conv_args, False, [0, 0], 1, [want_input, need_w, False]
            )
            if want_input:
                d = d_in
        dx = d if need_x else None
        du_in = dcore = du_out = None
        if need_w:
            if kind == "three-convs":
                du_in = d_weights[0][:, :, 0, 0].t()
                dcore = d_weights[1]
                du_out = d_weights[2][:, :, 0, 0]
            elif kind == "fold-in":
                dwc = d_weights[0]
                dcore = torch.einsum("riyx,is->rsyx", dwc, u_in)
                du_in = _pair_in(dwc, core)
                du_out = d_weights[1][:, :, 0, 0]
            elif kind == "fold-out":
                du_in = d_weights[0][:, :, 0, 0].t()
                dwc = d_weights[1]
                dcore = _unfold_out(u_out, dwc)
                du_out = _pair_spatial(dwc, core)
            else:
                dw = d_weights[0]
                dt = torch.einsum("oiyx,is->osyx", dw, u_in)
                du_in = _pair_in(dw, t)
                dcore = _unfold_out(u_out, dt)
                du_out = _pair_spatial(dt, core)
        d_bias = dy.sum((0, 2, 3)) if (ctx.has_bias and ctx.needs_input_grad[4]) else None
        # U_in's gradient is a transposed view, the core's comes in oneDNN's layout: in the parameters' instead
        du_in, dcore, du_out = (in_layout_of(d, p) for d, p in zip((du_in, dcore, du_out), (u_in, core, u_out)))
        return dx, du_in, dcore, du_out, d_bias, None, None, None


def _differentiable_backward(ctx, dy, x, u_in, core, u_out):
    """The backward for create_graph=True: the planned convolutions run again on the inputs (the folded weights
    and saved activations are constants to the planned backward) and differentiated (modes.grads_of_rerun)."""

    def rerun():
        weights, spatial, _ = _weights(ctx.kind, u_in, core, u_out)
        return _run(x, weights, spatial, None, *ctx.conv, keep=False)[0]

    dx, du_in, dcore, du_out = grads_of_rerun(rerun, (x, u_in, core, u_out), list(ctx.needs_input_grad[:4]), dy)
    d_bias = dy.sum((0, 2, 3)) if (ctx.has_bias and ctx.needs_input_grad[4]) else None
    return dx, du_in, dcore, du_out, d_bias, None, None, None


def route(x, u_in, core, u_out, conv: tuple, needs_grad: bool) -> tuple:
    """What a tucker_conv2d_torch call on x runs: (plan kind, conv, the no-grad weights when they are views of the
    factors else None, the index of the spatial conv, needs_grad). Folded weights are values computed from the
    factors, so a caller that keeps the route across calls (TuckerConv2d's call memo) must rebuild them per call:
    see run_route. A training route runs the same planned autograd.Function; keeping it only skips the checks and
    the plan lookup."""
    shapes = _plan_shapes(x, u_in, core, u_out)
    kind = kind_for(shapes, conv, x.dtype, x.device, needs_grad)
    views = _weights(kind, u_in, core, u_out)[0] if kind == "three-convs" and not needs_grad else None
    return kind, conv, views, _SPATIAL[kind], needs_grad


def run_route(x, route: tuple, u_in, core, u_out, bias) -> torch.Tensor:
    """A call along a route from `route`, on the factors' current values."""
    kind, conv, views, spatial, needs_grad = route
    if needs_grad:
        return TuckerConvFunction.apply(x, u_in, core, u_out, bias, kind, conv, OPTIONS.recompute)
    weights = views if views is not None else _weights(kind, u_in, core, u_out)[0]
    return _run(x, weights, spatial, bias, *conv, keep=False)[0]


def tucker_conv2d_torch(
    x: torch.Tensor,
    u_in: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    conv = (tuple(stride), tuple(padding), tuple(dilation))
    needs_grad = needs_autograd(x, (u_in, core, u_out), bias)
    shapes = _plan_shapes(x, u_in, core, u_out)
    kind = kind_for(shapes, conv, x.dtype, x.device, needs_grad)  # the planner's, or measured on a CPU
    # no-grad, or under vmap / grad / jacrev / dual tensors: plain convolutions, any autograd after them
    if not needs_grad or under_transform_or_dual():
        weights, spatial, _ = _weights(kind, u_in, core, u_out)
        return _run(x, weights, spatial, bias, *conv, keep=False)[0]
    return TuckerConvFunction.apply(x, u_in, core, u_out, bias, kind, conv, OPTIONS.recompute)

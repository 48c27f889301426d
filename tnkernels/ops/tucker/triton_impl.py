"""Triton backend for the Tucker-2 convolution: launcher, torch.library op with autograd, and the backend entry.

Forward: `tucker_fused_kernel` (U_in projection fused into the core's implicit GEMM). When R_out fits one register
block (<= _MAX_FUSED_R_OUT) the U_out projection and the bias run in the same kernel's epilogue; otherwise the R_out
intermediate h is written and projected by the shared `mode_product` kernel with the bias fused in its epilogue.
h is also written when a gradient is needed, because the U_out gradient reads it.

Backward: all Triton. The 1x1 projections and the factor gradients use the shared mode-product kernels; the
gradients through the k x k core convolution use tucker_grad_proj_kernel (transposed convolution as an implicit
GEMM) and tucker_grad_core_kernel (per-tap weight reduction), on the recomputed projection p = U_in^T x.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from ..modes import needs_autograd
from ..mpo.triton_impl import (
    _IMPORT_ERROR,
    _acc_dtype,
    _bucket,
    _flags,
    _num_sms,
    check_device,
    check_rows,
    device_guard,
    mode_product,
    mode_product_grad_b,
    refuse_double_backward,
)
from ..mpo.triton_impl import is_available as _mpo_is_available

if not _IMPORT_ERROR:
    import triton

    from .triton_kernels import tucker_fused_kernel, tucker_grad_core_kernel, tucker_grad_proj_kernel

# Above this many output ranks the [BM, R_out] accumulator no longer fits one register block comfortably.
_MAX_FUSED_R_OUT = 128


def is_available() -> tuple[bool, str]:
    """(True, "") when Triton kernels can run here: a CUDA GPU, or the CPU interpreter (TRITON_INTERPRET=1)."""
    return _mpo_is_available()


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _forward(
    x: torch.Tensor,
    u_in: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    write_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y [N, C_out, OH, OW], h [N, R_out, OH, OW] or an empty tensor when not written)."""
    nb, c_in, h_in, w_in = x.shape
    r_out, r_in, kh, kw = core.shape
    c_out = u_out.shape[0]
    oh = _out_size(h_in, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w_in, kw, stride[1], padding[1], dilation[1])
    fuse = r_out <= _MAX_FUSED_R_OUT
    need_h = write_h or not fuse
    if bias is not None:
        # The kernels index the bias as bias[co] (no stride argument): a strided view such as b[::2] would be read
        # wrongly. A bias is C_out elements, so the copy (made only for such views) costs nothing.
        bias = bias.contiguous()
    h = x.new_empty((nb, r_out, oh, ow)) if need_h else x.new_empty((0,))
    fmt = _output_format(x, core)
    y = torch.empty((nb, c_out, oh, ow), device=x.device, dtype=x.dtype, memory_format=fmt)
    m = nb * oh * ow
    if m == 0 or y.numel() == 0:
        return y, h
    bro = max(16, triton.next_power_of_2(r_out)) if fuse else 64
    check_rows(m, "tucker_conv2d")

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]), triton.cdiv(r_out, bro))

    tucker_fused_kernel[grid](
        x, u_in, core, u_out, bias if bias is not None else x, h, y,
        nb, c_in, h_in, w_in, r_in, r_out, c_out, oh, ow, _bucket(m),
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3),
        u_in.stride(0), u_in.stride(1),
        core.stride(0), core.stride(1), core.stride(2), core.stride(3),
        u_out.stride(0), u_out.stride(1),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, FUSE_OUT=fuse, WRITE_H=need_h, HAS_BIAS=fuse and bias is not None,
        BRO=bro, **_flags(x.dtype),
    )  # fmt: skip
    if not fuse:
        # y[n, co, p] = sum_r h[n, r, p] * U_out[co, r] + bias[co]   (U_out^T: strides swapped, no copy)
        y = mode_product(h.reshape(nb, r_out, oh * ow), u_out.t(), bias, bias_mod=1).reshape(nb, c_out, oh, ow)
        y = y.contiguous(memory_format=fmt)  # a copy only for channels-last input (mode_product writes NCHW)
    return y, h


def _output_format(x: torch.Tensor, core: torch.Tensor) -> torch.memory_format:
    """nn.Conv2d's output layout: channels-last when the input or the weight (here the core) is channels-last."""
    if suggest_memory_format(x) == torch.channels_last or suggest_memory_format(core) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


@torch.library.custom_op("tnkernels::tucker_conv2d_triton", mutates_args=())
def _tucker_op(
    x: torch.Tensor,
    u_in: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    write_h: bool,
) -> list[torch.Tensor]:
    """Returns [y, h]; h (the R_out intermediate) is empty unless write_h, and only feeds the backward."""
    with device_guard(x):  # triton launches on the current device, not x's (see device_guard)
        y, h = _forward(x, u_in, core, u_out, bias, tuple(stride), tuple(padding), tuple(dilation), write_h)
    return [y, h]


@_tucker_op.register_fake
def _(x, u_in, core, u_out, bias, stride, padding, dilation, write_h):
    nb, _, h_in, w_in = x.shape
    r_out, _, kh, kw = core.shape
    oh = _out_size(h_in, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w_in, kw, stride[1], padding[1], dilation[1])
    need_h = write_h or r_out > _MAX_FUSED_R_OUT
    h = x.new_empty((nb, r_out, oh, ow)) if need_h else x.new_empty((0,))
    fmt = _output_format(x, core)
    return [torch.empty((nb, u_out.shape[0], oh, ow), device=x.device, dtype=x.dtype, memory_format=fmt), h]


def _grad_proj(dh: torch.Tensor, core: torch.Tensor, in_hw: tuple[int, int], stride, padding, dilation) -> torch.Tensor:
    """dp = gradient of h = conv2d(p, core) with respect to p (the transposed convolution), [N, R_in, H, W]."""
    nb, r_out, oh, ow = dh.shape
    r_in, kh, kw = core.shape[1:]
    h_in, w_in = in_hw
    dp = dh.new_empty((nb, r_in, h_in, w_in))
    m = nb * h_in * w_in
    if dp.numel() == 0:
        return dp
    check_rows(m, "tucker_conv2d backward")

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]), triton.cdiv(r_in, meta["BRI"]))

    tucker_grad_proj_kernel[grid](
        dh, core, dp,
        nb, h_in, w_in, r_in, r_out, oh, ow, _bucket(m),
        core.stride(0), core.stride(1), core.stride(2), core.stride(3),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, **_flags(dh.dtype),
    )  # fmt: skip
    return dp


def _grad_core(dh: torch.Tensor, proj: torch.Tensor, core: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """d core = gradient of h = conv2d(p, core) with respect to core, [R_out, R_in, kh, kw] in core's dtype."""
    nb, r_out, oh, ow = dh.shape
    r_in, h_in, w_in = proj.shape[1:]
    kh, kw = core.shape[2:]
    m = nb * oh * ow
    acc_dtype = _acc_dtype(dh.dtype)
    if m == 0:
        return core.new_zeros(core.shape)  # contiguous like the kernel path (zeros_like keeps a channels-last core's)
    check_rows(m, "tucker_conv2d backward")
    # Split the pixel reduction into S slices (multiples of 256, a multiple of every config's BM) for parallelism,
    # summed below in fp32/fp64, as in mode_product_grad_b.
    unit = 256
    tiles = triton.cdiv(r_out, 64) * triton.cdiv(r_in, 64) * kh * kw
    splits = max(1, min(triton.cdiv(m, unit), (4 * _num_sms(dh.device)) // tiles))
    per_split = triton.cdiv(triton.cdiv(m, splits), unit) * unit
    splits = triton.cdiv(m, per_split)
    partial = torch.empty((splits, r_out, r_in, kh * kw), device=dh.device, dtype=acc_dtype)

    def grid(meta):
        return (triton.cdiv(r_out, meta["BRO"]), triton.cdiv(r_in, meta["BRI"]), kh * kw * splits)

    tucker_grad_core_kernel[grid](
        dh, proj, partial,
        nb, h_in, w_in, r_in, r_out, oh, ow, _bucket(m), per_split,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, **_flags(dh.dtype),
    )  # fmt: skip
    return partial.sum(0).reshape(core.shape).to(core.dtype)


def _backward_impl(grad_y, x, u_in, core, u_out, h, stride, padding, dilation, need_dx):
    nb, c_in, h_in, w_in = x.shape
    r_out, r_in = core.shape[:2]
    c_out, oh, ow = grad_y.shape[1:]
    dy = grad_y.contiguous().reshape(nb, c_out, oh * ow)
    h3 = h.reshape(nb, r_out, oh * ow)
    x3 = x.reshape(nb, c_in, h_in * w_in)
    # d U_out[co, r] = sum_{n, p} dy[n, co, p] h[n, r, p], reduced as [C_out, R_out] directly: a transposed
    # [R_out, C_out] result would not have the contiguous strides the fake promises, and torch.compile (inductor)
    # asserts the real strides against the fake ones.
    d_u_out = mode_product_grad_b(dy, h3)
    # dh[n, r, p] = sum_co dy[n, co, p] U_out[co, r]
    dh = mode_product(dy, u_out).reshape(nb, r_out, oh, ow)
    # The projection p = U_in^T x is recomputed rather than saved: it is as large as x's R_in channels.
    proj = mode_product(x3, u_in).reshape(nb, r_in, h_in, w_in)
    # Through the core convolution: implicit-GEMM kernels (transposed convolution, per-tap weight reduction).
    d_core = _grad_core(dh, proj, core, stride, padding, dilation)
    d_proj = _grad_proj(dh, core, (h_in, w_in), stride, padding, dilation)
    d_proj3 = d_proj.reshape(nb, r_in, h_in * w_in)
    # d U_in[c, r] = sum_{n, p} x[n, c, p] dproj[n, r, p];  dx[n, c, p] = sum_r dproj[n, r, p] U_in[c, r]
    d_u_in = mode_product_grad_b(x3, d_proj3)
    dx = mode_product(d_proj3, u_in.t()).reshape(x.shape) if need_dx else x.new_empty((0,))
    return [dx, d_u_in, d_core, d_u_out]


@torch.library.custom_op("tnkernels::tucker_conv2d_triton_backward", mutates_args=())
def _tucker_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    u_in: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    h: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    need_dx: bool,
) -> list[torch.Tensor]:
    """Returns [dx (empty when not needed), d_u_in, d_core, d_u_out], each contiguous like the fake below."""
    with device_guard(x):
        return _backward_impl(grad_y, x, u_in, core, u_out, h, stride, padding, dilation, need_dx)


@_tucker_backward_op.register_fake
def _(grad_y, x, u_in, core, u_out, h, stride, padding, dilation, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return [dx, u_in.new_empty(u_in.shape), core.new_empty(core.shape), u_out.new_empty(u_out.shape)]


def _setup_context(ctx, inputs, output):
    x, u_in, core, u_out, bias, stride, padding, dilation, _ = inputs
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, u_in, core, u_out, output[1])


def _backward(ctx, grads):
    x, u_in, core, u_out, h = ctx.saved_tensors
    grad_y = grads[0]
    need_dx = ctx.needs_input_grad[0]
    dx, d_u_in, d_core, d_u_out = _tucker_backward_op(grad_y, x, u_in, core, u_out, h, *ctx.conv, need_dx)
    # fp32 accumulation (fp64 for fp64) for the bias gradient, whatever the activation dtype.
    d_bias = grad_y.sum((0, 2, 3), dtype=_acc_dtype(grad_y.dtype)).to(grad_y.dtype) if ctx.has_bias else None
    return (dx if need_dx else None), d_u_in, d_core, d_u_out, d_bias, None, None, None, None


torch.library.register_autograd("tnkernels::tucker_conv2d_triton", _backward, setup_context=_setup_context)
refuse_double_backward("tnkernels::tucker_conv2d_triton_backward", "TuckerConv2d / tucker_conv2d")


def tucker_conv2d_triton(
    x: torch.Tensor,
    u_in: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Backend entry: F.conv2d(x, einsum('or,rsyx,is->oiyx', u_out, core, u_in), bias, stride, padding, dilation).

    Arguments arrive validated and normalized by tnkernels.ops.tucker_conv2d. x: [N, C_in, H, W] on CUDA (or CPU
    under TRITON_INTERPRET=1), any strides (channels_last too). Factors and bias are cast to x's dtype
    (differentiably). Differentiable in x, u_in, core, u_out and bias; double backward is not supported.
    """
    check_device(x, "tucker_conv2d(backend='triton')")
    params = []
    for name, t in (("u_in", u_in), ("core", core), ("u_out", u_out), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(
                f"tucker_conv2d(backend='triton'): {name} is on {t.device} but x is on {x.device}; "
                "move the module and its input to one device"
            )
        params.append(t if t is None or t.dtype == x.dtype else t.to(x.dtype))
    u_in, core, u_out, bias = params
    # h is only worth writing when someone will differentiate (the U_out gradient reads it).
    write_h = needs_autograd(x, (u_in, core, u_out), bias)
    y, _ = _tucker_op(x, u_in, core, u_out, bias, list(stride), list(padding), list(dilation), write_h)
    return y

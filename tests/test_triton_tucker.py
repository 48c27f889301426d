"""Triton Tucker-2 convolution (interpreter on CPU): forward and every gradient against the float64 reference.

The reference is F.conv2d with the dense weight rebuilt from the factors, so the check covers the fused kernel's
index arithmetic (stride, padding, dilation, non-square kernels) independently of the three-convolution path.
Block sizes are 16 under the interpreter; channel counts above 16 below exercise multi-tile loops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_rel, tolerance
from tnkernels.ops import tucker_conv2d, tucker_to_dense
from tnkernels.ops.tucker import triton_impl

pytestmark = pytest.mark.skipif(not triton_impl.is_available()[0], reason=triton_impl.is_available()[1])


def make_factors(c_in, r_in, r_out, c_out, kh, kw, dtype=torch.float32):
    u_in = torch.randn(c_in, r_in, dtype=torch.float64) / c_in**0.5
    core = torch.randn(r_out, r_in, kh, kw, dtype=torch.float64) / (r_in * kh * kw) ** 0.5
    u_out = torch.randn(c_out, r_out, dtype=torch.float64) / r_out**0.5
    return [t.to(dtype) for t in (u_in, core, u_out)]


def dense_reference(x, u_in, core, u_out, bias, stride, padding, dilation):
    return F.conv2d(x, tucker_to_dense(u_out, core, u_in), bias, stride, padding, dilation)


def check_against_reference(x, factors, bias, conv, dtype, what):
    """Forward and grads (x, u_in, core, u_out, bias) vs autograd through the dense float64 reference."""
    stride, padding, dilation = conv
    leaves = [t.detach().clone().requires_grad_() for t in (x, *factors)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    b = leaves[4] if bias is not None else None
    y = tucker_conv2d(*leaves[:4], b, stride=stride, padding=padding, dilation=dilation, backend="triton")
    assert y.dtype == dtype

    ref = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    y_ref = dense_reference(*ref[:4], ref[4] if bias is not None else None, stride, padding, dilation)
    tol = tolerance(dtype, "triton")
    assert_close_rel(y, y_ref, tol, f"{what}: y")

    grad_y = torch.randn_like(y_ref)
    y.backward(grad_y.to(dtype))
    y_ref.backward(grad_y)
    names = ["x", "u_in", "core", "u_out", "bias"][: len(leaves)]
    for name, leaf, r in zip(names, leaves, ref, strict=True):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, f"{what}: gradient of {name}"
        assert_close_rel(leaf.grad, r.grad, tol, f"{what}: grad {name}")


CASES = [
    # (N, C_in, H, W, R_in, R_out, C_out, kh, kw, stride, padding, dilation)
    (2, 5, 7, 6, 3, 4, 6, 3, 3, (2, 2), (1, 1), (1, 1)),  # odd sizes, stride 2
    (1, 3, 6, 7, 2, 3, 5, 3, 2, (1, 1), (2, 1), (2, 1)),  # non-square kernel, dilation, uneven padding
    (1, 18, 4, 4, 17, 5, 19, 1, 1, (1, 1), (0, 0), (1, 1)),  # 1x1 core; C_in, R_in, C_out span two tiles
    (2, 4, 5, 5, 1, 1, 3, 3, 3, (1, 2), (0, 1), (1, 1)),  # rank 1, mixed strides
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:9])))
def test_forward_and_grads_fp32(case):
    n, c_in, h, w, r_in, r_out, c_out, kh, kw, stride, padding, dilation = case
    x = torch.randn(n, c_in, h, w)
    factors = make_factors(c_in, r_in, r_out, c_out, kh, kw)
    check_against_reference(x, factors, torch.randn(c_out), (stride, padding, dilation), torch.float32, str(case))


def test_unfused_epilogue_path(monkeypatch):
    # R_out above the fused limit writes h and projects it with the shared mode-product kernel (bias in its
    # epilogue); lower the limit so the tiny test shape takes that path.
    monkeypatch.setattr(triton_impl, "_MAX_FUSED_R_OUT", 2)
    x = torch.randn(1, 3, 5, 5)
    factors = make_factors(3, 2, 4, 5, 3, 3)
    check_against_reference(x, factors, torch.randn(5), ((1, 1), (1, 1), (1, 1)), torch.float32, "unfused")
    with torch.no_grad():
        y = tucker_conv2d(x, *factors, None, padding=1, backend="triton")
    assert_close_rel(
        y,
        dense_reference(*(t.double() for t in (x, *factors)), None, 1, 1, 1),
        tolerance(torch.float32, "triton"),
        "unfused, no grad, no bias",
    )


def test_inference_without_grad_matches():
    # Without autograd the kernel skips writing the R_out intermediate; the output must not change.
    x = torch.randn(2, 4, 6, 5)
    factors = make_factors(4, 3, 3, 5, 3, 3)
    bias = torch.randn(5)
    with torch.no_grad():
        y = tucker_conv2d(x, *factors, bias, padding="same", backend="triton")
    y_ref = dense_reference(*(t.double() for t in (x, *factors, bias)), 1, 1, 1)
    assert_close_rel(y, y_ref, tolerance(torch.float32, "triton"), "no-grad forward")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x = torch.randn(1, 4, 5, 5).to(dtype)
    factors = make_factors(4, 3, 3, 5, 3, 3, dtype)
    check_against_reference(x, factors, torch.randn(5).to(dtype), ((1, 1), (1, 1), (1, 1)), dtype, str(dtype))


def test_channels_last_and_sliced_input():
    factors = make_factors(3, 2, 3, 4, 3, 3)
    conv = ((1, 1), (1, 1), (1, 1))
    x_cl = torch.randn(2, 3, 5, 4).to(memory_format=torch.channels_last)
    check_against_reference(x_cl, factors, torch.randn(4), conv, torch.float32, "channels_last")
    x_sl = torch.randn(1, 6, 5, 9)[:, ::2, :, ::2]  # strided channels and width
    assert not x_sl.is_contiguous()
    check_against_reference(x_sl, factors, None, conv, torch.float32, "sliced, no bias")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "channels_last_model"])
def test_output_layout_is_nn_conv2ds(layout, fused, monkeypatch, nan_poison):
    """The output has nn.Conv2d's strides for the same input (a channels-last model stays channels-last), and every
    element of the strided output is written (NaN-poisoned allocations)."""
    if not fused:
        monkeypatch.setattr(triton_impl, "_MAX_FUSED_R_OUT", 2)
    x = torch.randn(2, 6, 5, 8)
    x = {
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "sliced": x.contiguous(memory_format=torch.channels_last)[:, ::2, :, ::2],
        "channels_last_model": x,  # NCHW input, channels-last weights (model.to(memory_format=channels_last))
    }[layout]
    conv = torch.nn.Conv2d(x.shape[1], 5, 3, padding=1)
    factors = make_factors(x.shape[1], 2, 4, 5, 3, 3)
    if layout == "channels_last_model":
        conv = conv.to(memory_format=torch.channels_last)
        factors[1] = factors[1].contiguous(memory_format=torch.channels_last)
    want = conv(x)
    y = tucker_conv2d(x, *factors, conv.bias, padding=1, backend="triton")
    assert y.stride() == want.stride(), (layout, y.stride(), want.stride())
    check_against_reference(x, factors, conv.bias, ((1, 1), (1, 1), (1, 1)), torch.float32, layout)


def test_nan_poisoned_outputs_are_fully_written(nan_poison):
    x = torch.randn(2, 3, 5, 6)
    factors = make_factors(3, 2, 3, 4, 3, 3)
    check_against_reference(x, factors, torch.randn(4), ((2, 1), (1, 0), (1, 1)), torch.float32, "nan-poisoned")


def test_gradcheck_fp64():
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    params = [t.requires_grad_() for t in make_factors(2, 2, 2, 3, 2, 2, torch.float64)]
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, u_in, core, u_out, b):
        return tucker_conv2d(x, u_in, core, u_out, b, stride=1, padding=1, dilation=1, backend="triton")

    # fast_mode checks random projections of the Jacobian (one forward pair per input instead of one per element).
    assert torch.autograd.gradcheck(f, (x, *params, bias), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_opcheck_registration():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    factors = [t.requires_grad_() for t in make_factors(2, 2, 2, 3, 3, 3)]
    torch.library.opcheck(
        torch.ops.tnkernels.tucker_conv2d_triton.default,
        (x, *factors, torch.randn(3, requires_grad=True), [1, 1], [1, 1], [1, 1], True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_bad_input_raises_valueerror():
    factors = make_factors(3, 2, 2, 4, 3, 3)
    with pytest.raises(ValueError, match="dtype"):
        tucker_conv2d(torch.ones(1, 3, 5, 5, dtype=torch.int64), *factors, backend="triton")

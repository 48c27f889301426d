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


@pytest.mark.parametrize("fused", [True, False])
def test_strided_bias(fused, monkeypatch):
    # The kernels index bias[co] without a stride: a strided view (b[::2]) must reach them as its values. (Not
    # through check_against_reference, whose clone() would make the bias contiguous.) Unfused: mode_product's bias.
    if not fused:
        monkeypatch.setattr(triton_impl, "_MAX_FUSED_R_OUT", 1)
    x = torch.randn(1, 3, 4, 4)
    factors = make_factors(3, 2, 2, 4, 3, 3)
    bias = torch.randn(8)[::2]
    y = tucker_conv2d(x, *factors, bias, padding=1, backend="triton")
    want = dense_reference(*(t.double() for t in (x, *factors, bias)), 1, 1, 1)
    assert_close_rel(y, want, tolerance(torch.float32, "triton"), "strided bias")


def test_fp64_gradients_keep_fp64_precision():
    # The bias gradient too is accumulated in fp64 for fp64 (it was summed in fp32: ~1e-8 relative error).
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    factors = make_factors(2, 2, 3, 3, 3, 3, torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    check_against_reference(x, factors, bias, ((1, 1), (1, 1), (1, 1)), torch.float64, "fp64")


@pytest.mark.parametrize("channels_last_core", [False, True])
@pytest.mark.parametrize("batch", [2, 0])
def test_backward_op_matches_its_fake(batch, channels_last_core):
    # torch.compile (inductor) asserts that a custom op's real outputs have its fake outputs' strides: the backward
    # returned d_u_out transposed ([C_out, R_out] with strides (1, C_out)), and an empty batch returned d_core in a
    # channels-last core's layout, both against contiguous fakes.
    x = torch.randn(batch, 3, 5, 5)
    u_in, core, u_out = make_factors(3, 2, 4, 5, 3, 3)
    if channels_last_core:
        core = core.contiguous(memory_format=torch.channels_last)
    conv = ([1, 1], [1, 1], [1, 1])
    h = torch.ops.tnkernels.tucker_conv2d_triton(x, u_in, core, u_out, None, *conv, True)[1]
    grad_y = torch.randn(batch, 5, 5, 5)
    torch.library.opcheck(
        torch.ops.tnkernels.tucker_conv2d_triton_backward.default,
        (grad_y, x, u_in, core, u_out, h, *conv, True),
        test_utils=("test_schema", "test_faketensor"),
    )


# (N, C_in, H, W, C_out, R_in, R_out, k, stride): a ResNet-50 stage-1 conv at batch 256, the benchmark's layers
# (bench/gpu_bench.py), one above the fused R_out limit, and a 7x7 stem.
REAL_LAYERS = [
    (256, 64, 56, 56, 64, 32, 32, 3, 1),
    (256, 256, 56, 56, 256, 128, 128, 3, 1),
    (32, 512, 14, 14, 512, 128, 128, 3, 1),
    (32, 256, 28, 28, 512, 64, 192, 3, 2),
    (256, 3, 224, 224, 64, 3, 32, 7, 2),
]


@pytest.mark.parametrize("layer", REAL_LAYERS, ids=lambda c: "x".join(map(str, c)))
def test_launch_grids_fit_cuda_limits(layer, monkeypatch):
    # Forward (training and inference) and backward of real layers on meta tensors: every grid axis within CUDA's
    # limits (axes 1, 2 <= 65535) for every config a GPU may pick. Nothing runs.
    from tests.test_triton_mpo import assert_grids_fit, mpo_recorders, record_grids
    from tnkernels.ops.tucker import triton_kernels as tk

    n, c_in, h_in, w_in, c_out, r_in, r_out, k, s = layer
    recorders = mpo_recorders(monkeypatch) + record_grids(
        monkeypatch,
        triton_impl,
        [
            ("tucker_fused_kernel", [*tk._GPU_CONFIGS, tk.FP64_FUSED_CONFIG, *tk._CONFIGS]),
            ("tucker_grad_proj_kernel", [*tk._GPU_GRAD_CONFIGS, tk.FP64_GRAD_PROJ_CONFIG, *tk._GRAD_CONFIGS]),
            ("tucker_grad_core_kernel", [*tk._GPU_GRAD_CONFIGS, tk.FP64_GRAD_CORE_CONFIG, *tk._GRAD_CONFIGS]),
        ],
    )
    x = torch.empty(n, c_in, h_in, w_in, device="meta")
    u_in, core, u_out = (
        torch.empty(*shape, device="meta") for shape in ((c_in, r_in), (r_out, r_in, k, k), (c_out, r_out))
    )
    conv = ((s, s), (k // 2, k // 2), (1, 1))
    triton_impl._forward(x, u_in, core, u_out, None, *conv, write_h=False)
    y, h = triton_impl._forward(x, u_in, core, u_out, torch.empty(c_out, device="meta"), *conv, write_h=True)
    triton_impl._backward_impl(torch.empty_like(y), x, u_in, core, u_out, h, *conv, need_dx=True)
    assert_grids_fit(recorders)


def test_fp64_gpu_configs_compute_correctly(monkeypatch):
    # The small blocks a GPU uses for fp64 (BRI = BCO = 4, BM = 8 in the core gradient), under the interpreter.
    from tests.test_triton_mpo import autotuned_kernels

    for _, kernel, _, fp64_config in autotuned_kernels():
        monkeypatch.setattr(kernel, "configs", [fp64_config])
    x = torch.randn(2, 5, 5, 4, dtype=torch.float64)
    factors = make_factors(5, 6, 5, 6, 3, 2, torch.float64)  # R_in = 6 spans two BRI = 4 blocks, C_out two BCO
    bias = torch.randn(6, dtype=torch.float64)
    check_against_reference(x, factors, bias, ((2, 1), (1, 0), (1, 1)), torch.float64, "fp64 GPU configs")


def test_row_counts_past_int32_are_refused():
    # Rows (pixels, (p, q) pairs) are numbered in int32 inside the kernels, like triton's program ids: refuse a
    # count that would wrap, rather than compute garbage addresses. Meta tensors: nothing is allocated.
    x = torch.empty(2**31 // 16 + 1, 1, 4, 4, device="meta")
    u_in, core, u_out = (torch.empty(*s, device="meta") for s in ((1, 1), (1, 1, 1, 1), (1, 1)))
    with pytest.raises(ValueError, match="int32"):
        triton_impl._forward(x, u_in, core, u_out, None, (1, 1), (0, 0), (1, 1), write_h=False)
    with pytest.raises(ValueError, match="int32"):
        triton_impl.mode_product(torch.empty(2**31, 1, 1, device="meta"), torch.empty(1, 1, device="meta"))

"""The csrc/ thin-GEMM kernels (x A and h B + bias at small ranks) against float64, alone and inside the low-rank
layer's autograd.Function, whose every gradient is checked against autograd of the float64 reference.

The kernels are fp32-only, so these tests run in float32 and compare with the float64 result of the same values.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ExtCalls, assert_close_rel, tolerance
from tnkernels.ops.mpo import native_impl, thin_native, torch_low_rank
from tnkernels.ops.mpo.reference import mpo_linear_reference
from tnkernels.ops.mpo.torch_impl import mpo_linear_torch
from tnkernels.plan import options

_OK, _WHY = native_impl.is_available()
needs_native = pytest.mark.skipif(not _OK, reason=f"native extension not built: {_WHY}")
F32 = torch.float32


@needs_native
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 7, 130])
@pytest.mark.parametrize("k", [1, 15, 16, 33, 100])
@pytest.mark.parametrize("rank", [1, 3, 4, 5, 8, 13])
def test_thin_project_matches_float64(rows, k, rank):
    # rows and k off the 4-row and vector-width blockings, ranks off the rank groups: every tail is covered
    g = torch.Generator().manual_seed(rows * 1000 + k * 10 + rank)
    x = torch.randn(rows, k, generator=g)
    a = torch.randn(k, rank, generator=g)
    bt = torch.randn(rank, k, generator=g)
    for op in (a, bt.t()):  # A as stored, and a transposed view (dy B^T in the backward)
        got = thin_native._ext.thin_project(x, op)
        assert got.shape == (rows, rank) and got.dtype == F32
        if rows:
            assert_close_rel(got, x.double() @ op.double(), tolerance(F32), f"thin_project {rows}x{k} r{rank}")


@needs_native
@pytest.mark.parametrize("rows", [0, 1, 5, 64])
@pytest.mark.parametrize("n", [1, 17, 32, 100, 2100])
@pytest.mark.parametrize("rank", [1, 4, 8, 11])
@pytest.mark.parametrize("with_bias", [False, True])
def test_thin_expand_matches_float64(rows, n, rank, with_bias):
    # n = 2100 at rank 11 takes the column-blocked route (the B slice would not fit the L1 budget)
    g = torch.Generator().manual_seed(rows * 1000 + n + rank)
    h = torch.randn(rows, rank, generator=g)
    b = torch.randn(rank, n, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    got = thin_native._ext.thin_expand(h, b, bias)
    want = h.double() @ b.double() + (0 if bias is None else bias.double())
    assert got.shape == (rows, n)
    if rows:
        assert_close_rel(got, want, tolerance(F32), f"thin_expand {rows}x{n} r{rank}")


@needs_native
@pytest.mark.parametrize("rows", [0, 1, 5, 130])
@pytest.mark.parametrize("n", [1, 31, 32, 100, 2100])
@pytest.mark.parametrize("rank", [1, 5, 12, 13, 25])
def test_thin_reduce_matches_float64(rows, n, rank):
    # n off the 2-vector column strips (the scalar tail), ranks across the rank groups of 6 or 12
    g = torch.Generator().manual_seed(rows * 1000 + n + rank)
    h = torch.randn(rows, rank, generator=g)
    d = torch.randn(rows, n, generator=g)
    want = h.double().t() @ d.double()
    got = thin_native._ext.thin_reduce(h, d)
    got_t = thin_native._ext.thin_reduce(h, d, True)  # [n, rank]: dA = x^T dh in the parameter's layout
    assert got.shape == (rank, n) and got_t.shape == (n, rank) and got_t.is_contiguous()
    assert_close_rel(got, want, tolerance(F32), f"thin_reduce {rows}x{n} r{rank}")
    assert_close_rel(got_t, want.t(), tolerance(F32), f"thin_reduce transposed {rows}x{n} r{rank}")
    if rows == 0:
        assert not got.any() and not got_t.any()


@needs_native
def test_thin_expand_reads_a_transposed_b():
    g = torch.Generator().manual_seed(1)
    h, a = torch.randn(9, 5, generator=g), torch.randn(70, 5, generator=g)  # dh A^T with A [in, r] as stored
    assert_close_rel(thin_native._ext.thin_expand(h, a.t()), h.double() @ a.double().t(), tolerance(F32), "dh A^T")


@needs_native
def test_thin_kernels_reject_bad_operands_with_a_clear_error():
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="thin_project: x has 6 columns, a has 5 rows"):
        thin_native._ext.thin_project(x, torch.randn(5, 2))
    with pytest.raises(RuntimeError, match="thin_project: x must be a contiguous 2-D float32"):
        thin_native._ext.thin_project(x.double(), torch.randn(6, 2))
    with pytest.raises(RuntimeError, match="thin_expand: bias must be a contiguous float32 CPU tensor of 3"):
        thin_native._ext.thin_expand(torch.randn(4, 2), torch.randn(2, 3), torch.randn(4))
    with pytest.raises(RuntimeError, match="thin_reduce: h has 4 rows, d has 5"):
        thin_native._ext.thin_reduce(torch.randn(4, 2), torch.randn(5, 3))


def _count_native_calls(monkeypatch) -> ExtCalls:
    # the Python LowRankFunction's use of the kernels: the C++ Function (test_low_rank_cpp.py) calls them from C++,
    # where this counter cannot see them
    monkeypatch.setattr(torch_low_rank, "cpp_enabled", False)
    return ExtCalls(monkeypatch, thin_native)


@needs_native
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
# 2048 x 160 rows: [h, 1] in the backward; rank 10: only the backward's dy B^T is native
@pytest.mark.parametrize("rank, n_out", [(3, 1024), (8, 40), (8, 2048), (10, 40)])
def test_low_rank_layer_on_native_kernels_matches_float64(monkeypatch, with_bias, recompute, rank, n_out):
    calls = _count_native_calls(monkeypatch)
    g = torch.Generator().manual_seed(rank + n_out)
    rows, n_in = 160, 37
    cores = [
        (torch.randn(1, n_in, 1, rank, generator=g) / n_in**0.5).requires_grad_(),
        (torch.randn(rank, 1, n_out, 1, generator=g) / rank**0.5).requires_grad_(),
    ]
    x = torch.randn(rows, n_in, generator=g, requires_grad=True)
    bias = torch.randn(n_out, generator=g, requires_grad=True) if with_bias else None
    leaves = [x, *cores] + ([bias] if with_bias else [])
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = mpo_linear_reference(leaves64[0], leaves64[1:3], leaves64[3] if with_bias else None)
    dy = torch.randn(ref.shape, generator=g)
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
    with options(force="sweep-left", recompute=recompute):
        y = mpo_linear_torch(x, cores, bias)
        grads = torch.autograd.grad(y, leaves, dy)
        with torch.no_grad():
            y_inference = mpo_linear_torch(x, cores, bias)
    tol = tolerance(F32)
    assert_close_rel(y, ref, tol, "forward")
    assert_close_rel(y_inference, ref, tol, "inference forward")
    for k, (got, want) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close_rel(got, want, tol, f"grad of leaf {k}")
    # x A (training, inference, and again when recomputing) and dy B^T ran natively; h B + bias only with a bias
    narrow = rank <= 8  # the fixed table (tests/conftest.py): x A and h B + bias native up to rank 8
    assert calls.count("thin_project") == (3 + recompute if narrow else 1)
    assert calls.count("thin_expand") == (2 if with_bias and narrow else 0)


@needs_native
def test_low_rank_layer_keeps_torch_where_the_kernels_lose(monkeypatch):
    calls = _count_native_calls(monkeypatch)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(50, generator=g)
    few_rows = torch.randn(16, 30, generator=g)
    narrow = [torch.randn(1, 30, 1, 8, generator=g), torch.randn(8, 1, 50, 1, generator=g)]
    wide = [torch.randn(1, 30, 1, 9, generator=g), torch.randn(9, 1, 50, 1, generator=g)]
    wider = [torch.randn(1, 30, 1, 11, generator=g), torch.randn(11, 1, 50, 1, generator=g)]
    with torch.no_grad(), options(force="sweep-left"):
        mpo_linear_torch(few_rows, narrow, bias)  # 16 rows: x A stays on torch, h B + bias goes native
        assert calls.count("thin_project", "thin_expand") == (0, 1)
        mpo_linear_torch(torch.randn(200, 30, generator=g), wide, bias)  # rank 9: torch for both products
        mpo_linear_torch(torch.randn(200, 30, dtype=torch.float64), [c.double() for c in narrow], bias.double())
    assert calls.count("thin_project", "thin_expand") == (0, 1)
    x = torch.randn(200, 30, generator=g, requires_grad=True)
    for cores, dh_native in ((wide, 1), (wider, 0)):  # the backward's dy B^T: native up to rank 10
        leaves = [c.clone().requires_grad_() for c in cores]
        with options(force="sweep-left"):
            mpo_linear_torch(x, leaves, bias).backward(torch.randn(200, 50, generator=g))
        assert calls.count("thin_project", "thin_expand") == (dh_native, 1)
        calls.args.pop("thin_project", None)
    monkeypatch.setattr(thin_native, "enabled", False)
    with torch.no_grad(), options(force="sweep-left"):
        y = mpo_linear_torch(torch.randn(200, 30, generator=g), narrow, bias)
    assert calls.count("thin_project", "thin_expand") == (0, 1) and torch.isfinite(y).all()

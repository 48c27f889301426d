"""csrc/low_rank.cpp, the C++ autograd Function of a low-rank layer: its output and every gradient against autograd
of the float64 reference, for every combination of its flags, with and without bias, saving or recomputing h, and
for every subset of inputs that need a gradient; then that the layer routes training calls to it, and only where
it applies.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.helpers import ExtCalls, assert_close_rel, tolerance
from tnkernels.ops.mpo import native_impl, torch_low_rank
from tnkernels.ops.mpo.reference import mpo_linear_reference
from tnkernels.ops.mpo.torch_impl import mpo_linear_torch
from tnkernels.plan import options

_OK, _WHY = native_impl.is_available()
pytestmark = pytest.mark.skipif(not (_OK and torch_low_rank._HAS_CPP), reason=f"native extension not built: {_WHY}")

ALL_FLAGS = (
    torch_low_rank.PROJECT_NATIVE,
    torch_low_rank.EXPAND_NATIVE,
    torch_low_rank.FOLD_BIAS,
    torch_low_rank.ADD_IN_PLACE,
    torch_low_rank.DH_NATIVE,
    torch_low_rank.GRAD_A_TRANSPOSED,
    torch_low_rank.DX_NATIVE,
    torch_low_rank.DB_NATIVE,
    torch_low_rank.DA_NATIVE,
)
EVERY_COMBINATION = [sum(c) for n in range(len(ALL_FLAGS) + 1) for c in itertools.combinations(ALL_FLAGS, n)]


def _cpp(x2d, cores, bias, save_h, flags):
    return torch_low_rank.thin_native._ext.low_rank_linear(x2d, cores[0], cores[1], bias, save_h, flags)


def _leaves(rows, n_in, rank, n_out, with_bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=g, dtype=dtype)
    g1 = torch.randn(1, n_in, 1, rank, generator=g, dtype=dtype) / n_in**0.5
    g2 = torch.randn(rank, 1, n_out, 1, generator=g, dtype=dtype) / rank**0.5
    bias = torch.randn(n_out, generator=g, dtype=dtype) if with_bias else None
    dy = torch.randn(rows, n_out, generator=g, dtype=dtype)
    return x, [g1, g2], bias, dy


def _check_against_float64(x, cores, bias, dy, save_h, flags, needs, where):
    """needs: which of (x, g1, g2, bias) require a gradient."""
    inputs = [x, *cores, bias]
    leaves = [t.clone().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs, strict=True)]
    leaves64 = [t.detach().double().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs)]
    y = _cpp(leaves[0], leaves[1:3], leaves[3], save_h, flags)
    ref = mpo_linear_reference(leaves64[0], leaves64[1:3], leaves64[3])
    tol = tolerance(x.dtype)
    assert_close_rel(y, ref, tol, f"{where}: forward")
    wanted = [k for k, t in enumerate(leaves) if t is not None and t.requires_grad]
    if not wanted:
        assert not y.requires_grad
        return
    got = torch.autograd.grad(y, [leaves[k] for k in wanted], dy)
    want = torch.autograd.grad(ref, [leaves64[k] for k in wanted], dy.double())
    for k, g_, w in zip(wanted, got, want, strict=True):
        assert g_ is not None and g_.shape == inputs[k].shape, f"{where}: gradient {k} shape"
        assert_close_rel(g_, w, tol, f"{where}: gradient of input {k}")


@pytest.mark.parametrize("flags", EVERY_COMBINATION)
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_flag_combination_matches_float64(flags, with_bias):
    # fp32, rank 4 (every native kernel qualifies), a row count off the kernels' 4-row blocking; h saved or
    # recomputed by the parity of the flag count (recomputing only meets the x A and h^T dy flags)
    save_h = bin(flags).count("1") % 2 == 0
    x, cores, bias, dy = _leaves(13, 37, 4, 40, with_bias, torch.float32, seed=flags)
    needs = (True, True, True, with_bias)
    _check_against_float64(x, cores, bias, dy, save_h, flags, needs, f"flags {flags}")


@pytest.mark.parametrize("flags", [0, sum(ALL_FLAGS)])
@pytest.mark.parametrize("rank", [1, 9, 11, 70])  # native bounds: 8 (x A, h B), 10 (dy B^T); 70: past the fold
def test_flags_are_permissions_at_any_rank_and_dtype(flags, rank):
    # a flag names a kernel the C++ side may use; at ranks or dtypes the kernel does not take, ATen runs the product
    for dtype in (torch.float32, torch.float64):
        x, cores, bias, dy = _leaves(9, 20, rank, 33, True, dtype, seed=rank)
        _check_against_float64(x, cores, bias, dy, True, flags, (True,) * 4, f"rank {rank} {dtype}")


@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=4)])
@pytest.mark.parametrize("flags", [0, sum(ALL_FLAGS)])
def test_gradients_only_for_the_inputs_that_need_them(needs, flags):
    x, cores, bias, dy = _leaves(6, 10, 3, 12, True, torch.float64, seed=sum(needs))
    _check_against_float64(x, cores, bias, dy, False, flags, needs, f"needs {needs}")


def test_expanded_incoming_gradient():
    # y.sum() hands the backward an expanded (stride 0) dy; the Function materializes it before its GEMMs
    x, cores, bias, _ = _leaves(5, 8, 2, 6, True, torch.float64, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, *cores, bias)]
    _cpp(leaves[0], leaves[1:3], leaves[3], True, sum(ALL_FLAGS)).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, *cores, bias)]
    mpo_linear_reference(ref_leaves[0], ref_leaves[1:3], ref_leaves[3]).sum().backward()
    for k, (a, b) in enumerate(zip(leaves, ref_leaves, strict=True)):
        assert_close_rel(a.grad, b.grad, tolerance(torch.float64), f"gradient of input {k}")


def test_bad_operands_get_a_clear_error():
    x, cores, _, _ = _leaves(4, 6, 2, 5, False, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="low_rank_linear: expects x"):
        _cpp(torch.randn(4, 7), cores, None, True, 0)
    with pytest.raises(RuntimeError, match="low_rank_linear: expects x"):
        _cpp(x, [cores[0].transpose(1, 3), cores[1]], None, True, 0)


@pytest.mark.parametrize("rows, rank, n_out", [(1, 3, 40), (70, 4, 600), (200, 8, 2000), (300, 12, 900), (9, 80, 50)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_same_numbers_as_the_python_function(rows, rank, n_out, with_bias):
    # plan_flags reproduces LowRankFunction's choices, so both run the same products: equal up to the BLAS's
    # threading (and the native kernels' own order of summation, the same in both)
    x, cores, bias, dy = _leaves(rows, 24, rank, n_out, with_bias, torch.float32, seed=rows + rank)
    flags = torch_low_rank.plan_flags(rows, 24, rank, n_out)
    runs = []
    for use_cpp in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, *cores) + ((bias,) if with_bias else ())]
        b = leaves[3] if with_bias else None
        y = torch_low_rank.low_rank_train(leaves[0], leaves[1:3], b, True, flags if use_cpp else None)
        runs.append([y, *torch.autograd.grad(y, leaves, dy)])
    for k, (a, b) in enumerate(zip(*runs, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"output {k}: C++ and Python Functions differ")


def test_plan_flags_follow_the_python_functions_predicates():
    # on the fixed table of thin kernel bounds (tests/conftest.py; test_thin_bounds.py swaps in others)
    f = torch_low_rank
    assert f.plan_flags(1, 50, 4, 100) == f.EXPAND_NATIVE | f.DH_NATIVE  # one row: addmm, x A on the BLAS
    assert f.plan_flags(128, 50, 4, 100) & f.PROJECT_NATIVE  # x A native from 128 rows at rank <= 8
    assert not f.plan_flags(128, 50, 9, 100) & (f.PROJECT_NATIVE | f.EXPAND_NATIVE)
    assert f.plan_flags(128, 50, 10, 100) & f.DH_NATIVE and not f.plan_flags(128, 50, 11, 100) & f.DH_NATIVE
    assert f.plan_flags(1024, 50, 19, 3072) & f.FOLD_BIAS and not f.plan_flags(1024, 50, 65, 3072) & f.FOLD_BIAS
    assert not f.plan_flags(8, 50, 4, 1000) & f.FOLD_BIAS  # 8000 outputs: below the fold's bound
    assert f.plan_flags(8, 50, 20, 100) & f.ADD_IN_PLACE and not f.plan_flags(7, 50, 20, 100) & f.ADD_IN_PLACE
    for rows, rank in ((16, 4), (64, 4), (64, 8), (128, 19), (128, 21), (1024, 153)):
        transposed = bool(f.plan_flags(rows, 50, rank, 100) & f.GRAD_A_TRANSPOSED)
        assert transposed == f._transposed_grad_a_wins(rows, rank, 50), (rows, rank)


def test_training_calls_route_to_the_cpp_function_where_it_applies(monkeypatch):
    calls = ExtCalls(monkeypatch, torch_low_rank.thin_native)
    x, cores, bias, dy = _leaves(64, 30, 5, 40, True, torch.float32, seed=2)
    leaves = [c.clone().requires_grad_() for c in cores]
    with options(force="sweep-left"):
        y = mpo_linear_torch(x, leaves, bias)
        y.backward(dy)
        assert calls.flags("low_rank_linear") == [torch_low_rank.plan_flags(64, 30, 5, 40)]
        with torch.no_grad():  # inference keeps its own two-GEMM path
            mpo_linear_torch(x, leaves, bias)
        monkeypatch.setattr(torch_low_rank, "cpp_enabled", False)  # the switch: back to LowRankFunction
        y2 = mpo_linear_torch(x, leaves, bias)
    assert calls.count("low_rank_linear") == 1
    torch.testing.assert_close(y, y2)
    monkeypatch.setattr(torch_low_rank, "cpp_enabled", True)
    assert torch_low_rank.cpp_flags(x, [leaves[0], leaves[1]]) is not None
    assert torch_low_rank.cpp_flags(x, [leaves[0].transpose(1, 3).contiguous().transpose(1, 3), leaves[1]]) is None


def test_the_switch_takes_effect_on_remembered_routes(monkeypatch):
    # MPOLinear remembers a training call's route (flags included); flipping cpp_enabled must still move it
    from torch import nn

    from tnkernels import MPOLinear

    calls = ExtCalls(monkeypatch, torch_low_rank.thin_native)
    layer = MPOLinear.from_linear(nn.Linear(30, 40), ratio=8)
    assert len(layer.cores) == 2 and layer.cores[0].shape[2] == 1, "expects a low-rank structure"
    x = torch.randn(3, 30, requires_grad=True)
    monkeypatch.setattr(torch_low_rank, "cpp_enabled", False)
    y_python = layer(x)
    y_python.sum().backward()
    assert calls.count("low_rank_linear") == 0
    monkeypatch.setattr(torch_low_rank, "cpp_enabled", True)
    y_cpp = layer(x)
    assert calls.count("low_rank_linear") == 1
    monkeypatch.setattr(torch_low_rank, "cpp_enabled", False)
    layer(x)
    assert calls.count("low_rank_linear") == 1
    torch.testing.assert_close(y_python, y_cpp)


@pytest.mark.parametrize("flags", EVERY_COMBINATION[::7] + [sum(ALL_FLAGS)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_forward_matches_float64(flags, with_bias, dtype):
    # low_rank_forward: the C++ Function's forward without autograd, on the factors themselves
    x, cores, bias, _ = _leaves(13, 37, 4, 40, with_bias, dtype, seed=flags)
    a, b = torch_low_rank.factors(cores)
    y = torch_low_rank.thin_native._ext.low_rank_forward(x, a, b, bias, flags)
    assert_close_rel(y, mpo_linear_reference(x.double(), [c.double() for c in cores], bias), tolerance(dtype), "y")


def test_inference_forward_rejects_mismatched_factors():
    with pytest.raises(RuntimeError, match="low_rank_forward: expects x"):
        ext = torch_low_rank.thin_native._ext
        ext.low_rank_forward(torch.randn(2, 5), torch.randn(4, 3), torch.randn(3, 6), None, 0)


def test_layer_inference_runs_one_cpp_call_per_remembered_call(monkeypatch):
    from torch import nn

    from tnkernels import MPOLinear

    calls = ExtCalls(monkeypatch, torch_low_rank.thin_native)
    lin = nn.Linear(30, 40)
    layer = MPOLinear.from_linear(lin, ratio=8)
    x = torch.randn(3, 30)
    with torch.no_grad():
        first = layer(x)  # the full path (Python products), which the memo then remembers
        assert calls.count("low_rank_forward") == 0
        again = layer(x)  # the remembered route: one C++ call
        assert calls.count("low_rank_forward") == 1
        monkeypatch.setattr(torch_low_rank, "cpp_enabled", False)
        off = layer(x)
        assert calls.count("low_rank_forward") == 1
    ref = mpo_linear_reference(x.double(), [c.double() for c in layer.cores], layer.bias.double())
    for y in (first, again, off):
        assert_close_rel(y, ref, tolerance(torch.float32), "inference")

"""Planned MPO / Tucker execution equals the float64 reference, forward and backward, for every plan kind."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import assert_close_rel, tolerance
from tnkernels.ops.mpo.reference import mpo_linear_reference
from tnkernels.ops.mpo.torch_impl import clear_dense_cache, dense_cache_bytes, mpo_linear_torch
from tnkernels.ops.tucker.reference import tucker_conv2d_reference
from tnkernels.ops.tucker.torch_impl import tucker_conv2d_torch
from tnkernels.plan import PLAN_KINDS, TUCKER_KINDS, mpo_decision, options

F64 = torch.float64


@st.composite
def mpo_chains(draw, min_cores: int = 1):
    n = draw(st.integers(min_cores, 4))
    in_modes = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    out_modes = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    bonds = [1] + draw(st.lists(st.integers(1, 3), min_size=n - 1, max_size=n - 1)) + [1]
    shapes = [(bonds[k], in_modes[k], out_modes[k], bonds[k + 1]) for k in range(n)]
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    return shapes, lead, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def _check_mpo(shapes, lead, with_bias, seed, kind, recompute, fold=None):
    g = torch.Generator().manual_seed(seed)
    cores = [torch.randn(s, generator=g, dtype=F64, requires_grad=True) for s in shapes]
    n_in = int(torch.tensor([s[1] for s in shapes]).prod())
    n_out = int(torch.tensor([s[2] for s in shapes]).prod())
    x = torch.randn(*lead, n_in, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(n_out, generator=g, dtype=F64, requires_grad=True) if with_bias else None
    leaves = [x, *cores] + ([bias] if with_bias else [])
    ref = mpo_linear_reference(x, cores, bias)
    dy = torch.randn(ref.shape, generator=g, dtype=F64)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    with options(force=kind, recompute=recompute, fold=fold):
        y = mpo_linear_torch(x, cores, bias)
        grads = torch.autograd.grad(y, leaves, dy)
        with torch.no_grad():
            y_nograd = mpo_linear_torch(x, cores, bias)
        y_inplace = mpo_linear_torch(x, cores, bias)
        y_inplace += 1.0  # models add residuals in place (Falcon: `mlp_output += attention_output`)
        grads_inplace = torch.autograd.grad(y_inplace, leaves, dy)
    tol = tolerance(F64)
    assert_close_rel(y, ref, tol, f"{kind} forward")
    assert_close_rel(y_nograd, ref, tol, f"{kind} no-grad forward")
    assert_close_rel(y_inplace, ref + 1.0, tol, f"{kind} forward, then in place")
    for k, (a, a_inplace, e) in enumerate(zip(grads, grads_inplace, ref_grads, strict=True)):
        assert_close_rel(a, e, tol, f"{kind} grad of leaf {k}")
        assert_close_rel(a_inplace, e, tol, f"{kind} grad of leaf {k} after an in-place op on the output")


@pytest.mark.parametrize("kind", [k for k in PLAN_KINDS if k != "merge"])
@settings(max_examples=12, deadline=None)
@given(chain=mpo_chains(), recompute=st.booleans(), fold=st.sampled_from([None, True, False]))
def test_mpo_plan_matches_reference(kind, chain, recompute, fold):
    _check_mpo(*chain, kind=kind, recompute=recompute, fold=fold)


@settings(max_examples=12, deadline=None)
@given(chain=mpo_chains(min_cores=3), recompute=st.booleans(), fold=st.sampled_from([None, True, False]))
def test_mpo_merge_plan_matches_reference(chain, recompute, fold):
    _check_mpo(*chain, kind="merge", recompute=recompute, fold=fold)


@pytest.mark.parametrize("fold", [True, False])
def test_folded_and_batched_steps_are_really_used(fold):
    shapes = ((1, 4, 3, 2), (2, 5, 2, 3), (3, 3, 4, 1))
    with options(force="sweep-left", fold=fold):
        dec = mpo_decision(shapes, 6, torch.float32, torch.device("cpu"), True)
    # every step but the last (whose trailing dimension is 1, always one GEMM) follows the forced choice
    assert dec.forward.folds[:-1] == (fold,) * (len(shapes) - 1) and dec.forward.folds[-1] is False
    _check_mpo(list(shapes), (6,), True, 0, kind="sweep-left", recompute=False, fold=fold)


def test_merge_needs_three_cores():
    cores = [torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1)]
    with options(force="merge"), pytest.raises(ValueError, match="merge needs 3 or more cores"):
        mpo_linear_torch(torch.randn(3, 4), cores, None)


def test_non_contiguous_input_and_float32():
    cores = [torch.randn(1, 4, 3, 2), torch.randn(2, 5, 2, 3), torch.randn(3, 3, 4, 1)]
    x = torch.randn(60, 7).t()  # [7, 60] view with stride (1, 7)
    ref = mpo_linear_reference(x.double(), [c.double() for c in cores])
    for kind in PLAN_KINDS:
        with options(force=kind):
            assert_close_rel(mpo_linear_torch(x, cores, None), ref, tolerance(torch.float32), kind)


def test_recompute_saves_no_states_but_the_default_may():
    shapes = ((1, 8, 8, 4), (4, 8, 8, 4), (4, 8, 8, 1))
    with options(force="sweep-left"):
        saving = mpo_decision(shapes, 32, torch.float32, torch.device("cpu"), True)
    with options(force="sweep-left", recompute=True):
        recomputing = mpo_decision(shapes, 32, torch.float32, torch.device("cpu"), True)
    assert saving.save_states and saving.saved_bytes > 0
    assert not recomputing.save_states and recomputing.saved_bytes == 0


def test_empty_batch():
    cores = [torch.randn(1, 2, 3, 2), torch.randn(2, 2, 2, 1)]
    bias = torch.randn(6)
    y = mpo_linear_torch(torch.randn(0, 4), cores, bias)
    assert y.shape == (0, 6)


def test_cache_dense_reuses_and_invalidates():
    clear_dense_cache()
    cores = [torch.randn(1, 3, 4, 5), torch.randn(5, 4, 3, 1)]
    x = torch.randn(6, 12)
    with options(force="rebuild", cache_dense=True), torch.no_grad():
        dec = mpo_decision(tuple(tuple(c.shape) for c in cores), 6, torch.float32, torch.device("cpu"), False)
        assert dec.forward.seconds > dec.dense_seconds  # merge + GEMM always costs more than the GEMM alone
        y = mpo_linear_torch(x, cores, None)
        assert dense_cache_bytes() == dec.dense_bytes
        assert_close_rel(y, mpo_linear_reference(x, cores), tolerance(torch.float32), "cache_dense")
        cores[1].mul_(2)  # an in-place update bumps the version: the cached weight must not be reused
        y2 = mpo_linear_torch(x, cores, None)
        assert_close_rel(y2, mpo_linear_reference(x, cores), tolerance(torch.float32), "cache_dense after update")
    clear_dense_cache()


def test_cache_dense_sees_replaced_data_and_dtype_changes():
    """`p.data = t` keeps the parameter's identity and version, and module.half() / .bfloat16() work that way:
    the stale float32 weight was reused (a wrong result, then a dtype error; found 2026-12-02)."""
    from tnkernels import MPOLinear

    clear_dense_cache()
    layer = MPOLinear(12, 12, in_modes=(3, 4), out_modes=(4, 3), bonds=(5,), backend="torch")
    x = torch.randn(6, 12)
    with options(force="rebuild", cache_dense=True), torch.no_grad():
        layer(x)
        layer.cores[0].data = 2 * layer.cores[0].data
        expected = mpo_linear_reference(x, [c.detach() for c in layer.cores], layer.bias)
        assert_close_rel(layer(x), expected, tolerance(torch.float32), "cache_dense after p.data = t")
        layer.bfloat16()
        y = layer(x.bfloat16())
        assert y.dtype == torch.bfloat16
        expected = mpo_linear_reference(x.double(), [c.double() for c in layer.cores], layer.bias.double())
        assert_close_rel(y, expected, tolerance(torch.bfloat16), "cache_dense after .bfloat16()")
    clear_dense_cache()


@st.composite
def tucker_cases(draw):
    n = draw(st.integers(1, 2))
    c_in, c_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    r_in, r_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h = draw(st.integers(dilation[0] * (kh - 1) + 1, 8))
    w = draw(st.integers(dilation[1] * (kw - 1) + 1, 8))
    return (n, c_in, h, w), (c_in, r_in), (r_out, r_in, kh, kw), (c_out, r_out), stride, padding, dilation


@pytest.mark.parametrize("kind", TUCKER_KINDS)
@settings(max_examples=10, deadline=None)
@given(
    case=tucker_cases(),
    with_bias=st.booleans(),
    recompute=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_tucker_plan_matches_reference(kind, case, with_bias, recompute, channels_last, seed):
    xs, uis, cs, uos, stride, padding, dilation = case
    g = torch.Generator().manual_seed(seed)
    x, u_in, core, u_out = (torch.randn(s, generator=g, dtype=F64) for s in (xs, uis, cs, uos))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, u_in, core, u_out = (t.requires_grad_() for t in (x, u_in, core, u_out))
    bias = torch.randn(uos[0], generator=g, dtype=F64, requires_grad=True) if with_bias else None
    leaves = [x, u_in, core, u_out] + ([bias] if with_bias else [])
    ref = tucker_conv2d_reference(x, u_in, core, u_out, bias, stride, padding, dilation)
    dy = torch.randn(ref.shape, generator=g, dtype=F64)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    with options(tucker_force=kind, recompute=recompute):
        y = tucker_conv2d_torch(x, u_in, core, u_out, bias, stride, padding, dilation)
        grads = torch.autograd.grad(y, leaves, dy)
        y_inplace = tucker_conv2d_torch(x, u_in, core, u_out, bias, stride, padding, dilation)
        y_inplace += 1.0  # a residual added in place
        grads_inplace = torch.autograd.grad(y_inplace, leaves, dy)
    assert_close_rel(y, ref, tolerance(F64), f"{kind} forward")
    for k, (a, a_inplace, e) in enumerate(zip(grads, grads_inplace, ref_grads, strict=True)):
        assert_close_rel(a, e, tolerance(F64), f"{kind} grad of leaf {k}")
        assert_close_rel(a_inplace, e, tolerance(F64), f"{kind} grad of leaf {k} after an in-place op")


@pytest.mark.parametrize("kind", TUCKER_KINDS)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("weight_fmt", [torch.contiguous_format, torch.channels_last])
def test_tucker_output_layout_is_nn_conv2ds(kind, grad, fmt, weight_fmt):
    """An NCHW input gives an NCHW output and a channels-last input a channels-last one, as nn.Conv2d does, for
    every kind: a folded kernel from einsum has channels-last strides and must not carry them to the output. A
    model made channels-last (core and conv weight channels-last) gives channels-last outputs, as nn.Conv2d does."""
    conv = torch.nn.Conv2d(5, 6, 3, stride=(1, 2), padding=1).to(memory_format=weight_fmt)
    x = torch.randn(2, 5, 7, 9).contiguous(memory_format=fmt).requires_grad_(grad)
    u_in, core, u_out = (
        torch.randn(5, 3),
        torch.randn(4, 3, 3, 3).contiguous(memory_format=weight_fmt),
        torch.randn(6, 4),
    )
    want = conv(x)
    with options(tucker_force=kind), torch.set_grad_enabled(grad):
        y = tucker_conv2d_torch(x, u_in, core, u_out, conv.bias, (1, 2), (1, 1), (1, 1))
    assert y.shape == want.shape and y.stride() == want.stride(), (kind, y.stride(), want.stride())


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_planned_paths_trace_without_graph_breaks(kind):
    import torch._dynamo as dynamo

    cores = [torch.randn(s, requires_grad=True) for s in ((1, 4, 3, 2), (2, 5, 2, 3), (3, 3, 4, 1))]
    bias = torch.randn(24, requires_grad=True)
    u_in, core, u_out = torch.randn(3, 2), torch.randn(2, 2, 3, 3), torch.randn(4, 2)

    def f(x, img):
        y = mpo_linear_torch(x, cores, bias)
        z = tucker_conv2d_torch(img, u_in, core, u_out, None, (1, 1), (1, 1), (1, 1))
        return y.sum() + z.sum()

    x, img = torch.randn(5, 60), torch.randn(2, 3, 6, 6)
    with options(force=kind):
        f(x, img)  # plan searches happen eagerly, outside the traced region
        dynamo.reset()
        explanation = dynamo.explain(f)(x, img)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]


# ------------------------------------------------------------------------------------- low-rank fast path
@st.composite
def low_rank_chains(draw):
    n_in, n_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rank = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 40]))  # both sides of the layout switches (16, 32)
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    shapes = [(1, n_in, 1, rank), (rank, 1, n_out, 1)]
    return shapes, lead, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=20, deadline=None)
@given(chain=low_rank_chains(), recompute=st.booleans(), cpp=st.booleans())
def test_low_rank_fast_path_matches_reference(chain, recompute, cpp):
    # the planner's own pick (no force) for a low-rank chain is the left sweep, which runs as two GEMMs; training
    # on the C++ Function (where built) or on the Python LowRankFunction
    from tnkernels.ops.mpo import torch_low_rank

    saved = torch_low_rank.cpp_enabled
    torch_low_rank.cpp_enabled = cpp and torch_low_rank._HAS_CPP
    try:
        _check_mpo(*chain, kind=None, recompute=recompute)
    finally:
        torch_low_rank.cpp_enabled = saved


def test_low_rank_chain_takes_the_two_gemm_path(monkeypatch):
    from tnkernels.ops.mpo import torch_impl, torch_low_rank

    calls = {"low_rank": 0, "generic": 0}
    real_low, real_generic = torch_low_rank.low_rank_train, torch_impl.MPOChainFunction.apply

    def count(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)

        return wrapped

    monkeypatch.setattr(torch_low_rank, "low_rank_train", count("low_rank", real_low))
    monkeypatch.setattr(torch_impl.MPOChainFunction, "apply", count("generic", real_generic))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 12, 1, 3, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(3, 1, 10, 1, generator=g, dtype=F64, requires_grad=True)
    x = torch.randn(7, 12, generator=g, dtype=F64)  # no gradient for x, no bias: those branches too
    y = mpo_linear_torch(x, [a, b], None)
    assert calls == {"low_rank": 1, "generic": 0}
    dy = torch.randn(y.shape, generator=g, dtype=F64)
    ref = mpo_linear_reference(x, [a, b], None)
    assert_close_rel(y, ref, tolerance(F64), "low-rank forward")
    got = torch.autograd.grad(y, [a, b], dy)
    want = torch.autograd.grad(ref, [a, b], dy)
    for k, (u, v) in enumerate(zip(got, want, strict=True)):
        assert_close_rel(u, v, tolerance(F64), f"low-rank grad of core {k}")
    # a balanced chain (and a forced non-sweep plan) still goes through the generic executor
    mpo_linear_torch(
        torch.randn(2, 4, dtype=F64),
        [torch.randn(1, 2, 2, 2, dtype=F64, requires_grad=True), torch.randn(2, 2, 2, 1, dtype=F64)],
        None,
    )
    with options(force="rebuild"):
        mpo_linear_torch(x, [a, b], None)
    assert calls == {"low_rank": 1, "generic": 2}


@pytest.mark.parametrize(
    "rows, n_in, n_out, rank, folds",
    [
        (256, 16, 1024, 4, True),  # big enough output and thin rank: the bias rides in the GEMM as an extra rank
        (2, 16, 1024, 4, False),  # small output: addmm
        (256, 16, 1024, 70, False),  # wide rank: addmm
    ],
)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("cpp", [True, False])  # training on the C++ Function (where built) or on LowRankFunction
def test_low_rank_bias_layouts_match_reference(monkeypatch, rows, n_in, n_out, rank, folds, recompute, cpp):
    from tnkernels.ops.mpo import torch_low_rank

    monkeypatch.setattr(torch_low_rank, "cpp_enabled", cpp and torch_low_rank._HAS_CPP)

    taken = []
    real = torch_low_rank._fold_bias
    monkeypatch.setattr(torch_low_rank, "_fold_bias", lambda h, b: taken.append(real(h, b)) or taken[-1])
    shapes = [(1, n_in, 1, rank), (rank, 1, n_out, 1)]
    _check_mpo(shapes, (rows,), True, seed=rows + rank, kind="sweep-left", recompute=recompute)
    assert taken and all(t == folds for t in taken)  # the Python side: inference (and training without C++)
    assert bool(torch_low_rank.plan_flags(rows, n_in, rank, n_out) & torch_low_rank.FOLD_BIAS) == folds  # the C++ side


@pytest.mark.parametrize("train_cores", [False, True])
@pytest.mark.parametrize("cpp", [True, False])
def test_low_rank_folded_bias_gradient_with_frozen_or_trained_cores(monkeypatch, train_cores, cpp):
    from tnkernels.ops.mpo import torch_low_rank

    monkeypatch.setattr(torch_low_rank, "cpp_enabled", cpp and torch_low_rank._HAS_CPP)
    # the folded forward keeps [h, 1]; the bias gradient comes from [h, 1]^T dy when dB is computed anyway, and
    # from dy.sum(0) when the cores are frozen
    g = torch.Generator().manual_seed(7)
    rows, n_in, n_out, rank = 256, 16, 1024, 4
    g1 = torch.randn(1, n_in, 1, rank, generator=g, dtype=F64, requires_grad=train_cores)
    g2 = torch.randn(rank, 1, n_out, 1, generator=g, dtype=F64, requires_grad=train_cores)
    x = torch.randn(rows, n_in, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(n_out, generator=g, dtype=F64, requires_grad=True)
    leaves = [x, bias] + ([g1, g2] if train_cores else [])
    ref = mpo_linear_reference(x, [g1, g2], bias)
    dy = torch.randn(ref.shape, generator=g, dtype=F64)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    with options(force="sweep-left"):
        y = mpo_linear_torch(x, [g1, g2], bias)
    grads = torch.autograd.grad(y, leaves, dy)
    assert_close_rel(y, ref, tolerance(F64), "forward")
    for k, (a, e) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close_rel(a, e, tolerance(F64), f"grad of leaf {k}")

"""Decompositions: exactness, monotone truncation, tolerance guarantee, Eckart-Young, parameter counts, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnkernels import (
    RatioUnreachableError,
    auto_modes,
    mpo_bonds_for_ratio,
    mpo_decompose,
    mpo_num_params,
    mpo_to_dense,
    tucker_decompose,
    tucker_num_params,
    tucker_ranks_for_error,
    tucker_ranks_for_ratio,
    tucker_to_dense,
)

modes_st = st.lists(st.integers(1, 5), min_size=2, max_size=4)


def rel_err(a, b):
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_mpo_exact_at_full_bond(data):
    in_modes = data.draw(modes_st)
    out_modes = data.draw(st.lists(st.integers(1, 5), min_size=len(in_modes), max_size=len(in_modes)))
    w = torch.randn(math.prod(out_modes), math.prod(in_modes), dtype=torch.float64)
    cores, err = mpo_decompose(w, in_modes, out_modes, return_error=True)
    assert rel_err(mpo_to_dense(cores), w) < 1e-10
    assert err < 1e-10
    assert [tuple(g.shape[1:3]) for g in cores] == list(zip(in_modes, out_modes))
    assert cores[0].shape[0] == 1 and cores[-1].shape[3] == 1


def test_mpo_convention_matches_the_formula():
    in_modes, out_modes = (2, 3, 4), (3, 2, 2)
    w = torch.randn(12, 24, dtype=torch.float64)
    g1, g2, g3 = mpo_decompose(w, in_modes, out_modes)
    # W[j, i] = sum_r G1[0,i1,j1,r1] G2[r1,i2,j2,r2] G3[r2,i3,j3,0], indices split row-major with the first slowest.
    for j1, j2, j3, i1, i2, i3 in [(0, 1, 1, 1, 2, 3), (2, 0, 1, 0, 1, 2), (1, 1, 0, 1, 0, 0)]:
        value = g1[0, i1, j1] @ g2[:, i2, j2, :] @ g3[:, i3, j3, 0]
        j = (j1 * 2 + j2) * 2 + j3
        i = (i1 * 3 + i2) * 4 + i3
        assert value.item() == pytest.approx(w[j, i].item(), abs=1e-12)


def test_mpo_error_never_grows_with_bond():
    w = torch.randn(60, 48, dtype=torch.float64)
    errors = [mpo_decompose(w, (4, 3, 4), (5, 3, 4), max_bond=b, return_error=True)[1] for b in range(1, 21)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10


@settings(max_examples=20, deadline=None)
@given(tol=st.floats(0.01, 0.9), seed=st.integers(0, 1000))
def test_mpo_achieved_error_within_rel_tol(tol, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(36, 40, generator=g, dtype=torch.float64)
    cores, err = mpo_decompose(w, (2, 5, 4), (3, 4, 3), rel_tol=tol, return_error=True)
    actual = rel_err(mpo_to_dense(cores), w)
    assert actual <= tol + 1e-12
    assert err == pytest.approx(actual, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("bond", [1, 3, 7, 12])
def test_two_cores_are_optimal_eckart_young(bond):
    in_modes, out_modes = (8, 5), (6, 8)
    w = torch.randn(48, 40, dtype=torch.float64)
    cores, err = mpo_decompose(w, in_modes, out_modes, max_bond=bond, return_error=True)
    # The 2-core MPO is a rank-`bond` approximation of W reshaped to [(i1 j1), (i2 j2)].
    m = w.reshape(6, 8, 8, 5).permute(2, 0, 3, 1).reshape(8 * 6, 5 * 8)
    s = torch.linalg.svdvals(m)
    optimal = (s[bond:] ** 2).sum().sqrt() / torch.linalg.norm(w)
    assert err == pytest.approx(optimal.item(), rel=1e-8, abs=1e-12)
    assert rel_err(mpo_to_dense(cores), w) == pytest.approx(optimal.item(), rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("in_modes,out_modes,bond", [((4, 6), (8, 3), 5), ((2, 3, 5, 2), (3, 2, 2, 5), 4)])
def test_parameter_count_formula(in_modes, out_modes, bond):
    w = torch.randn(math.prod(out_modes), math.prod(in_modes))
    cores = mpo_decompose(w, in_modes, out_modes, max_bond=bond)
    bonds = [g.shape[3] for g in cores[:-1]]
    assert sum(g.numel() for g in cores) == mpo_num_params(in_modes, out_modes, bonds)


@pytest.mark.parametrize("ratio", [2, 4, 16, 64])
def test_bonds_for_ratio_reach_the_ratio(ratio):
    bonds = mpo_bonds_for_ratio((32, 24), (64, 48), ratio)
    assert 768 * 3072 / mpo_num_params((32, 24), (64, 48), bonds) >= ratio
    # and the next larger bond would not fit, so the budget is used
    assert 768 * 3072 / mpo_num_params((32, 24), (64, 48), [bonds[0] + 1]) < ratio


def test_cores_keep_dtype_and_are_float64_accurate_from_float32():
    w = torch.randn(20, 12)
    cores = mpo_decompose(w, (3, 4), (5, 4))
    assert all(g.dtype == torch.float32 for g in cores)
    assert rel_err(mpo_to_dense(cores), w) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mpo_and_tucker_on_cuda():
    w = torch.randn(20, 12, device="cuda", dtype=torch.float64)
    assert rel_err(mpo_to_dense(mpo_decompose(w, (3, 4), (5, 4))), w) < 1e-10
    k = torch.randn(8, 6, 3, 3, device="cuda", dtype=torch.float64)
    assert rel_err(tucker_to_dense(*tucker_decompose(k, (8, 6))), k) < 1e-10


# --------------------------------------------------------------------------------------------------- auto_modes
@pytest.mark.parametrize("n,cores", [(768, 2), (3072, 2), (1600, 3), (6400, 4), (1000, 3), (10, 2), (4800, 2)])
def test_auto_modes_balanced_and_exact(n, cores):
    modes = auto_modes(n, cores)
    assert math.prod(modes) == n and len(modes) == cores
    assert max(modes) <= 4 * n ** (1 / cores)
    assert min(modes) >= 2


def test_auto_modes_refuses_large_prime_with_a_suggestion():
    with pytest.raises(ValueError, match="large prime factor 1733.*pad the layer"):
        auto_modes(50257, 2)
    with pytest.raises(ValueError, match="cannot be split into 3 modes"):
        auto_modes(7, 3)


# ------------------------------------------------------------------------------------------------------ Tucker
@settings(max_examples=15, deadline=None)
@given(c_out=st.integers(1, 9), c_in=st.integers(1, 9), kh=st.integers(1, 3), kw=st.integers(1, 3))
def test_tucker_exact_at_full_ranks(c_out, c_in, kh, kw):
    k = torch.randn(c_out, c_in, kh, kw, dtype=torch.float64)
    u_out, core, u_in = tucker_decompose(k, (c_out, c_in))
    assert rel_err(tucker_to_dense(u_out, core, u_in), k) < 1e-10
    assert torch.einsum("or,rsyx,is->oiyx", u_out, core, u_in).shape == k.shape


TALL_UNFOLDINGS = [((9, 1, 1, 1), (9, 1)), ((32, 3, 3, 3), (32, 3)), ((8, 16, 1, 1), (8, 16)),
                   ((4, 64, 1, 1), (4, 20)), ((64, 16, 1, 1), (10, 4))]  # fmt: skip


@pytest.mark.parametrize("n_iter", [0, 2])
@pytest.mark.parametrize(("shape", "ranks"), TALL_UNFOLDINGS)
def test_tucker_factors_have_the_ranks_asked_for_past_the_unfoldings_ranks(shape, ranks, n_iter):
    """A tall unfolding (C_out > C_in kh kw, or a HOOI projection) has fewer left singular vectors than channels:
    the factors are completed to the ranks asked for with orthonormal columns (they had fewer columns, and
    TuckerConv2d.from_conv crashed copying them), and the decomposition stays exact where the ranks cover the
    unfoldings' ranks (tucker_max_ranks); tucker_ranks_for_error never asks for more than those."""
    from tnkernels.decompose import tucker_max_ranks

    k = torch.randn(*shape, dtype=torch.float64)
    u_out, core, u_in = tucker_decompose(k, ranks, n_iter=n_iter)
    assert (u_out.shape, core.shape, u_in.shape) == ((shape[0], ranks[0]), (*ranks, *shape[2:]), (shape[1], ranks[1]))
    for u in (u_out, u_in):
        assert rel_err(u.t() @ u, torch.eye(u.shape[1], dtype=torch.float64)) < 1e-12
    attainable = tucker_max_ranks(shape)
    if all(r >= a for r, a in zip(ranks, attainable, strict=True)):
        assert rel_err(tucker_to_dense(u_out, core, u_in), k) < 1e-10
    assert tucker_ranks_for_error(k, 0.0) == attainable


def test_tucker_hooi_never_worse_than_hosvd_and_error_is_exact():
    k = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    (factors0, e0) = tucker_decompose(k, (8, 6), return_error=True)
    (factors3, e3) = tucker_decompose(k, (8, 6), n_iter=3, return_error=True)
    assert e3 <= e0 + 1e-12
    assert e0 == pytest.approx(rel_err(tucker_to_dense(*factors0), k), rel=1e-9)


@pytest.mark.parametrize("shape", [(64, 64, 3, 3), (128, 64, 1, 1), (64, 3, 7, 7)])
@pytest.mark.parametrize("ratio", [2, 4])
def test_tucker_ranks_for_ratio(shape, ratio):
    ranks = tucker_ranks_for_ratio(shape, ratio)
    assert math.prod(shape) / tucker_num_params(shape, ranks) >= ratio


def test_tucker_ranks_for_error_meet_the_tolerance():
    k = torch.randn(32, 16, 3, 3, dtype=torch.float64)
    for tol in (0.05, 0.3, 0.6):
        ranks = tucker_ranks_for_error(k, tol)
        assert rel_err(tucker_to_dense(*tucker_decompose(k, ranks)), k) <= tol


# ----------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    w = torch.randn(12, 8)
    with pytest.raises(ValueError, match=r"in_modes \(3, 3\) multiply to 9, but in_features is 8"):
        mpo_decompose(w, (3, 3), (3, 4))
    with pytest.raises(ValueError, match="max_bond must be a positive int"):
        mpo_decompose(w, (2, 4), (3, 4), max_bond=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        mpo_decompose(torch.full((12, 8), float("nan")), (2, 4), (3, 4))
    with pytest.raises(ValueError, match="must be > 1"):
        mpo_bonds_for_ratio((2, 4), (3, 4), 1.0)
    with pytest.raises(RatioUnreachableError, match="cannot be reached"):
        mpo_bonds_for_ratio((2, 4), (3, 4), 1e6)
    with pytest.raises(ValueError, match="ranks"):
        tucker_decompose(torch.randn(4, 4, 3, 3), (5, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        tucker_decompose(torch.full((4, 4, 3, 3), float("inf")), (2, 2))


def test_large_matrix_truncated_path_is_near_optimal_and_reports_the_true_error():
    # 1024 x 1024 unfolding at bond 64 takes the randomized branch; give it a decaying spectrum like trained weights.
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(1024, 1024, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(1024, 1024, generator=g, dtype=torch.float64))
    s = torch.arange(1, 1025, dtype=torch.float64) ** -0.7
    m = (u * s) @ v.T  # m = W reshaped to [(i1 j1), (i2 j2)]
    w = m.reshape(32, 32, 32, 32).permute(1, 3, 0, 2).reshape(1024, 1024)  # back to W[(j1 j2), (i1 i2)]
    cores, err = mpo_decompose(w, (32, 32), (32, 32), max_bond=64, return_error=True)
    optimal = ((s[64:] ** 2).sum().sqrt() / s.norm()).item()
    assert err == pytest.approx(rel_err(mpo_to_dense(cores), w), rel=1e-6)
    assert optimal <= err <= 1.01 * optimal


def test_lapack_threads_single_threads_small_factorizations_and_restores():
    from tnkernels.decompose.linalg import _SINGLE_THREAD_MAX, lapack_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with lapack_threads(torch.zeros(300, 40)):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with lapack_threads(torch.zeros(_SINGLE_THREAD_MAX + 1, _SINGLE_THREAD_MAX + 1)[:, :]):
            assert torch.get_num_threads() == 2  # big: the factorization keeps every thread
        with pytest.raises(RuntimeError, match="boom"), lapack_threads(torch.zeros(8, 8)):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2  # restored on error too
    finally:
        torch.set_num_threads(before)

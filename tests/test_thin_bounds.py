"""thin_bounds: the per-machine table of where the thin kernels beat the BLAS. Its measurement and disk cache, its
lookup, and the low-rank layer's numbers when the table sends every product to the kernels or none: outputs and
every gradient against autograd of the float64 reference, in the Python and the C++ Function.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import assert_close_rel, tolerance
from tnkernels.ops.mpo import native_impl, thin_bounds, thin_native, torch_low_rank
from tnkernels.ops.mpo.reference import mpo_linear_reference
from tnkernels.ops.mpo.torch_impl import mpo_linear_torch
from tnkernels.plan import options

_OK, _WHY = native_impl.is_available()
needs_native = pytest.mark.skipif(not _OK, reason=f"native extension not built: {_WHY}")


def _table(rule, source="test") -> thin_bounds.ThinBounds:
    rows = tuple(rule(r) for r in range(thin_bounds.MAX_RANK + 1))
    return thin_bounds.ThinBounds({k: rows for k in thin_bounds.KINDS}, source)


@pytest.fixture
def table():
    """Swap the table for one test, then return to the fixed one (tests/conftest.py)."""
    yield thin_bounds.use
    thin_bounds.use(thin_bounds.fixed_bounds())


def test_lookup_reads_the_row_bound_per_rank():
    t = thin_bounds.fixed_bounds()
    assert t.wins("project", 128, 8) and not t.wins("project", 127, 8) and not t.wins("project", 10**6, 9)
    assert t.wins("project_t", 1, 10) and not t.wins("project_t", 10**6, 11)
    assert t.wins("grad_a_t", 64, 4) and not t.wins("grad_a_t", 64, 5) and t.wins("grad_a_t", 6 * 30, 30)
    assert not t.wins("expand_t", 10**6, 1)
    assert not t.wins("expand", 1, thin_bounds.MAX_RANK + 1)  # past the table: always the BLAS


@needs_native
def test_measured_once_then_read_from_disk(tmp_path, monkeypatch, table):
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TNK_THIN_BOUNDS")
    measured = []
    real = thin_bounds.measure_bounds

    def fake_measure():  # the real one takes seconds; its ladder logic is tested below
        measured.append(1)
        return _table(lambda r: 16 if r <= 8 else thin_bounds.NEVER, "measured")

    monkeypatch.setattr(thin_bounds, "measure_bounds", fake_measure)
    table(None)
    first = thin_bounds.bounds()
    assert first.source == "measured" and measured == [1]
    stored = json.loads((tmp_path / "thin_bounds.json").read_text())
    assert list(stored) == [thin_bounds._key()] and len(stored[thin_bounds._key()]["project"]) == 129
    assert not list(tmp_path.glob(".tmp.*")), "the atomic write left its temporary file"
    table(None)  # a new process: the table comes from disk, nothing is measured
    second = thin_bounds.bounds()
    assert second.source == "disk" and measured == [1] and second.min_rows == first.min_rows
    (tmp_path / "thin_bounds.json").write_text("{not json")  # a damaged cache is measured again, not an error
    table(None)
    assert thin_bounds.bounds().source == "measured" and measured == [1, 1]
    monkeypatch.setattr(thin_bounds, "measure_bounds", real)


@needs_native
def test_measurement_gives_a_monotone_table(monkeypatch):
    # the kernel "wins" where rows * rank is large enough and at rank 2 never: the table keeps, per rank, the fewest
    # rows from which it wins at every larger count, and ranks between the measured ones take the next one's bound
    monkeypatch.setattr(
        thin_bounds, "_native_wins", lambda kind, rows, rank: rank != 2 and (rows >= 128 or (rows == 1 and rank == 4))
    )
    t = thin_bounds.measure_bounds()
    assert t.source == "measured"
    for kind in thin_bounds.KINDS:
        assert t.min_rows[kind][1] == 128  # wins at 128 and 512
        assert t.min_rows[kind][2] == thin_bounds.NEVER
        assert t.min_rows[kind][4] == 128  # the win at one row alone does not count: 16 rows lose
        assert t.min_rows[kind][9] == t.min_rows[kind][12] == 128
        assert t.min_rows[kind][thin_bounds.MAX_RANK] == 128


def test_swapping_the_table_forgets_remembered_routes():
    from tnkernels.plan.cache import plan_generation

    before = plan_generation()
    thin_bounds.use(thin_bounds.fixed_bounds())
    assert plan_generation() > before


@needs_native
@pytest.mark.parametrize("everywhere", [True, False])
@pytest.mark.parametrize("cpp", [True, False])
@pytest.mark.parametrize("rows, rank, with_bias", [(1, 3, True), (6, 12, False), (37, 20, True), (130, 65, True)])
def test_layer_matches_float64_with_every_kernel_on_or_off(table, monkeypatch, everywhere, cpp, rows, rank, with_bias):
    table(_table(lambda r: 1 if everywhere else thin_bounds.NEVER))
    monkeypatch.setattr(torch_low_rank, "cpp_enabled", cpp and torch_low_rank._HAS_CPP)
    calls = {"thin_project": 0, "thin_expand": 0, "thin_reduce": 0, "low_rank_linear": 0}
    real = thin_native._ext

    class Counting:
        def __getattr__(self, name):
            fn = getattr(real, name)

            def wrapped(*args):
                calls[name] += 1
                return fn(*args)

            return wrapped

    monkeypatch.setattr(thin_native, "_ext", Counting())
    g = torch.Generator().manual_seed(rows + rank)
    n_in, n_out = 29, 45
    leaves = [
        torch.randn(rows, n_in, generator=g),
        torch.randn(1, n_in, 1, rank, generator=g) / n_in**0.5,
        torch.randn(rank, 1, n_out, 1, generator=g) / rank**0.5,
    ] + ([torch.randn(n_out, generator=g)] if with_bias else [])
    leaves = [t.requires_grad_() for t in leaves]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    bias, bias64 = (leaves[3], leaves64[3]) if with_bias else (None, None)
    ref = mpo_linear_reference(leaves64[0], leaves64[1:3], bias64)
    dy = torch.randn(ref.shape, generator=g)
    want = torch.autograd.grad(ref, leaves64, dy.double())
    with options(force="sweep-left"):
        y = mpo_linear_torch(leaves[0], leaves[1:3], bias)
        got = torch.autograd.grad(y, leaves, dy)
        with torch.no_grad():
            y_inference = mpo_linear_torch(leaves[0], leaves[1:3], bias)
    tol = tolerance(torch.float32)
    assert_close_rel(y, ref, tol, "forward")
    assert_close_rel(y_inference, ref, tol, "inference forward")
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close_rel(a, b, tol, f"gradient of input {k}")
    python_kernel_calls = calls["thin_project"] + calls["thin_expand"] + calls["thin_reduce"]
    if not everywhere:
        assert python_kernel_calls == 0
    elif cpp and torch_low_rank._HAS_CPP:  # training in C++; here the inference forward's x A and h B + bias
        assert calls["low_rank_linear"] == 1 and python_kernel_calls == 1 + with_bias
    else:  # x A twice, dy B^T, dh A^T, h^T dy, x^T dh, and h B + bias twice (without a bias, h B is on torch)
        assert calls["low_rank_linear"] == 0 and python_kernel_calls == 6 + 2 * with_bias

"""thin_bounds: the per-machine table of where the thin kernels beat the BLAS. Its measurement and disk cache, its
lookup, and the low-rank layer's numbers when the table sends every product to the kernels or none: outputs and
every gradient against autograd of the float64 reference, in the Python and the C++ Function.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import ExtCalls, assert_close_rel, tolerance
from tnkernels.ops.mpo import native_impl, thin_bounds, thin_native, torch_low_rank
from tnkernels.ops.mpo.reference import mpo_linear_reference
from tnkernels.ops.mpo.torch_impl import mpo_linear_torch
from tnkernels.plan import options
from tnkernels.plan.calibrate import machine_key

_OK, _WHY = native_impl.is_available()
needs_native = pytest.mark.skipif(not _OK, reason=f"native extension not built: {_WHY}")


class _Table:
    """A table that sends every product to the kernels from `min_rows` rows (NEVER: to torch)."""

    source = "test"

    def __init__(self, min_rows: int) -> None:
        self._min_rows = min_rows

    def wins(self, kind, rows, rank, width):
        return rows >= self._min_rows


@pytest.fixture
def table():
    """Swap the table for one test, then return to the fixed one (tests/conftest.py)."""
    yield thin_bounds.use
    thin_bounds.use(thin_bounds.FixedBounds())


def test_fixed_rules_per_rank():
    t = thin_bounds.FixedBounds()
    assert t.wins("project", 128, 8, 1) and not t.wins("project", 127, 8, 1) and not t.wins("project", 10**6, 9, 1)
    assert t.wins("project_t", 1, 10, 1) and not t.wins("project_t", 10**6, 11, 1)
    assert t.wins("grad_a_t", 64, 4, 1) and not t.wins("grad_a_t", 64, 5, 1) and t.wins("grad_a_t", 6 * 30, 30, 1)
    assert not t.wins("expand_t", 10**6, 1, 1) and not t.wins("reduce", 10**6, 1, 1)
    assert not t.wins("expand", 1, thin_bounds.MAX_RANK + 1, 1)  # past the table: always the BLAS


@needs_native
def test_entries_measured_on_first_use_then_read_from_disk(tmp_path, monkeypatch, table):
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TNK_THIN_BOUNDS")
    measured = []

    def fake_entry(kind, rank, width):  # the real one times kernels; its ladder logic is tested below
        measured.append((kind, rank, width))
        return 16 if rank <= 8 else thin_bounds.NEVER

    monkeypatch.setattr(thin_bounds, "measure_entry", fake_entry)
    table(None)
    first = thin_bounds.bounds()
    assert first.source == "measured" and measured == []  # nothing is measured before a layer asks
    assert first.wins("project", 16, 4, 384) and not first.wins("project", 15, 4, 384)
    assert not first.wins("project", 10**6, 9, 384)
    assert measured == [("project", 4, 384), ("project", 9, 384)]  # one entry per rank and width, once each
    assert not first.wins("project", 8, 4, 384) and measured[-1] == ("project", 9, 384)
    stored = json.loads((tmp_path / "thin_bounds.json").read_text())
    assert stored == {machine_key(): {"project|4|384": 16, "project|9|384": thin_bounds.NEVER}}
    assert not list(tmp_path.glob(".tmp.*")), "the atomic write left its temporary file"
    table(None)  # a new process: the entries come from disk, nothing is measured again
    assert thin_bounds.bounds().wins("project", 16, 4, 384) and len(measured) == 2
    (tmp_path / "thin_bounds.json").write_text("{not json")  # a damaged cache is measured again, not an error
    table(None)
    assert thin_bounds.bounds().wins("project", 16, 4, 384) and len(measured) == 3
    thin_bounds.forget()  # drops this machine's entries: measured again on the next use
    assert thin_bounds.bounds().wins("project", 16, 4, 384) and len(measured) == 4


def test_an_entry_is_the_fewest_rows_from_which_every_larger_count_wins(monkeypatch):
    # the kernel "wins" from 128 rows, and by chance at one row: the entry is 128, not 1 (16 rows lost)
    monkeypatch.setattr(thin_bounds, "_native_wins", lambda kind, rows, rank, width: rows >= 128 or rows == 1)
    assert thin_bounds.measure_entry("project", 4, 100) == 128
    monkeypatch.setattr(thin_bounds, "_native_wins", lambda kind, rows, rank, width: rows < 512)
    assert thin_bounds.measure_entry("project", 4, 100) == thin_bounds.NEVER  # loses at the largest count
    monkeypatch.setattr(thin_bounds, "_native_wins", lambda kind, rows, rank, width: True)
    assert thin_bounds.measure_entry("reduce", 4, 100) == 1
    assert thin_bounds.measure_entry("reduce", thin_bounds.MAX_RANK + 1, 100) == thin_bounds.NEVER


@needs_native
@pytest.mark.parametrize("kind", thin_bounds.KINDS)
def test_every_product_can_be_timed(kind):
    # the real timing on a tiny shape: each kind's native and torch calls run and give a verdict
    assert isinstance(thin_bounds._native_wins(kind, 16, 3, 40, rounds=1), bool)


def test_nothing_is_measured_while_compiling(table, monkeypatch):
    table(_Table(1))
    assert thin_bounds.bounds().source == "test"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert thin_bounds.bounds().source == "fixed"


def test_swapping_the_table_forgets_remembered_routes():
    from tnkernels.plan.cache import plan_generation

    before = plan_generation()
    thin_bounds.use(thin_bounds.FixedBounds())
    assert plan_generation() > before


@needs_native
@pytest.mark.parametrize("everywhere", [True, False])
@pytest.mark.parametrize("cpp", [True, False])
@pytest.mark.parametrize("rows, rank, with_bias", [(1, 3, True), (6, 12, False), (37, 20, True), (130, 65, True)])
def test_layer_matches_float64_with_every_kernel_on_or_off(table, monkeypatch, everywhere, cpp, rows, rank, with_bias):
    table(_Table(1 if everywhere else thin_bounds.NEVER))
    monkeypatch.setattr(torch_low_rank, "cpp_enabled", cpp and torch_low_rank._HAS_CPP)
    calls = ExtCalls(monkeypatch, thin_native)
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
    python_kernel_calls = sum(calls.count("thin_project", "thin_expand", "thin_reduce"))
    if not everywhere:
        assert python_kernel_calls == 0
    elif cpp and torch_low_rank._HAS_CPP:  # training in C++; here the inference forward's x A and h B + bias
        assert calls.count("low_rank_linear") == 1 and python_kernel_calls == 1 + with_bias
    else:  # x A twice, dy B^T, dh A^T, h^T dy, x^T dh, and h B + bias twice (without a bias, h B is on torch)
        assert calls.count("low_rank_linear") == 0 and python_kernel_calls == 6 + 2 * with_bias

"""The native (csrc/) MPO kernel against the float64 reference.

Tests that need the compiled extension are skipped, with the reason, when it was not built; CI sets
TNK_EXPECT_NATIVE=1 so that a build that silently failed turns into a failing test instead of skipped ones.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from tests.helpers import assert_close_rel, tolerance
from tnkernels.ops import mpo_linear
from tnkernels.ops.mpo import native_impl
from tnkernels.ops.mpo.reference import mpo_linear_reference

_OK, _WHY = native_impl.is_available()
needs_native = pytest.mark.skipif(not _OK, reason=f"native extension not built: {_WHY}")

# gemm routes of the compiled entry: 1 = fused micro-kernel (what auto uses), 2 = gather + ATen GEMM per step.
GEMM_ROUTES = (1, 2)


def make_cores(in_modes, out_modes, bonds, dtype=torch.float32, gen=None):
    ranks = [1, *bonds, 1]
    return [
        torch.randn(ranks[k], in_modes[k], out_modes[k], ranks[k + 1], generator=gen, dtype=dtype)
        / math.sqrt(ranks[k] * in_modes[k])
        for k in range(len(in_modes))
    ]


def reference64(x, cores, bias):
    """The float64 reference computed from the very same (fp32 or bf16-rounded) values."""
    return mpo_linear_reference(x.double(), [g.double() for g in cores], None if bias is None else bias.double())


def test_expected_native_is_built():
    """Fails (not skips) when the environment says the extension must be there: catches silent build failures."""
    if os.environ.get("TNK_EXPECT_NATIVE", "") != "1":
        pytest.skip("TNK_EXPECT_NATIVE is not 1: the native extension is optional here")
    assert native_impl.native_available(), f"TNK_EXPECT_NATIVE=1 but the native extension is missing: {_WHY}"


def test_availability_is_consistent():
    ok, why = native_impl.is_available()
    assert ok == native_impl.native_available()
    assert ok or "TNK_NO_NATIVE" in why, "the reason must tell the user how to get the extension"


CASES = [
    # (in_modes, out_modes, bonds, rows)
    ((7,), (5,), [], 1),  # one core: a plain matrix
    ((3, 5), (4, 2), [1], 17),  # bond 1
    ((2, 3), (5, 7), [6], 1),
    ((3, 5, 2), (2, 7, 3), [4, 9], 17),  # odd modes, column remainders
    ((2, 3, 2, 5), (3, 2, 5, 2), [3, 20, 5], 4),
    ((2, 2, 3, 2, 2), (3, 2, 2, 2, 3), [4, 7, 6, 3], 17),  # 5 cores
    ((2, 2, 2, 2, 2, 3), (3, 2, 2, 2, 2, 2), [2, 4, 8, 4, 2], 3),  # 6 cores
    ((4, 8), (16, 3), [17], 33),  # N = 16*k + 3 columns, 33 rows = several row tiles and chunks
    ((3, 40), (7, 19), [11], 7),  # K = 440 > one K block (256): accumulating tiles, column remainders, partial tiles
]


@needs_native
@pytest.mark.parametrize("gemm", GEMM_ROUTES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("in_modes,out_modes,bonds,rows", CASES)
def test_matches_float64_reference(in_modes, out_modes, bonds, rows, with_bias, gemm):
    cores = make_cores(in_modes, out_modes, bonds)
    x = torch.randn(rows, math.prod(in_modes))
    bias = torch.randn(math.prod(out_modes)) if with_bias else None
    y = native_impl._ext.mpo_chain_forward(x, cores, bias, gemm)
    assert y.dtype == torch.float32
    assert_close_rel(y, reference64(x, cores, bias), tolerance(torch.float32, "native"), "native vs float64")


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_random_shapes_through_dispatcher(threads):
    """Random chains (2..6 cores, bonds 1..12, modes 1..7) through mpo_linear(backend='native'), with leading
    dims; 1 and 2 threads exercise the in-step parallel split and the parallel row chunks."""
    rng = random.Random(1234 + threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(12):
            n = rng.randint(2, 6)
            in_modes = [rng.randint(1, 7) for _ in range(n)]
            out_modes = [rng.randint(1, 7) for _ in range(n)]
            bonds = [rng.randint(1, 12) for _ in range(n - 1)]
            lead = rng.choice([(1,), (17,), (2, 3), (3, 1, 5)])
            cores = make_cores(in_modes, out_modes, bonds)
            x = torch.randn(*lead, math.prod(in_modes))
            bias = torch.randn(math.prod(out_modes)) if rng.random() < 0.5 else None
            y = mpo_linear(x, cores, bias, backend="native")
            what = f"modes {in_modes}->{out_modes} bonds {bonds} lead {lead}"
            assert_close_rel(y, reference64(x, cores, bias), tolerance(torch.float32, "native"), what)
    finally:
        torch.set_num_threads(old)


@needs_native
def test_bf16_weights_accumulate_in_fp32():
    """bf16 cores are exact inputs: the result must match the float64 contraction of those bf16 values at fp32
    accuracy (an fp32 accumulator), far tighter than a bf16 result could be."""
    cores = [g.bfloat16() for g in make_cores((3, 4, 5), (5, 2, 6), [7, 11])]
    x = torch.randn(17, 60)
    bias = torch.randn(60)
    y = mpo_linear(x, cores, bias, backend="native")
    assert y.dtype == torch.float32
    assert_close_rel(y, reference64(x, cores, bias), tolerance(torch.float32, "native"), "bf16 cores")


@needs_native
def test_bf16_input_gives_bf16_output():
    cores = make_cores((3, 4), (2, 5), [6])
    x = torch.randn(5, 12).bfloat16()
    y = mpo_linear(x, cores, None, backend="native")
    assert y.dtype == torch.bfloat16
    # only the final rounding to bf16 differs from the float64 result of the same inputs
    assert_close_rel(y, reference64(x, cores, None), tolerance(torch.bfloat16, "torch"), "bf16 input")


@needs_native
def test_non_contiguous_inputs_and_empty_batch():
    cores = make_cores((4, 3), (2, 5), [5])
    x = torch.randn(12, 9).t()  # [9, 12], non-contiguous
    nc_cores = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in cores]  # same values, strided
    assert not nc_cores[0].is_contiguous()
    y = mpo_linear(x, nc_cores, None, backend="native")
    assert_close_rel(y, reference64(x, cores, None), tolerance(torch.float32, "native"), "strided")
    empty = mpo_linear(torch.randn(0, 12), cores, None, backend="native")
    assert empty.shape == (0, 10)


@needs_native
def test_no_grad_inference_with_trainable_parameters():
    cores = [g.requires_grad_() for g in make_cores((3, 4), (4, 3), [5])]
    x = torch.randn(2, 12)
    with torch.no_grad():
        y = mpo_linear(x, cores, None, backend="native")
    assert_close_rel(y, reference64(x, cores, None), tolerance(torch.float32, "native"), "no_grad")
    with torch.inference_mode():
        y2 = mpo_linear(x, cores, None, backend="native")
    assert torch.equal(y, y2)


@needs_native
def test_gradient_request_is_refused_with_the_fix():
    cores = [g.requires_grad_() for g in make_cores((3, 4), (4, 3), [5])]
    with pytest.raises(RuntimeError, match="backend='torch'"):
        mpo_linear(torch.randn(2, 12), cores, None, backend="native")
    with pytest.raises(RuntimeError, match="backend='torch'"):
        mpo_linear(torch.randn(2, 12, requires_grad=True), [g.detach() for g in cores], None, backend="native")


@needs_native
def test_bad_inputs_raise_value_errors_naming_the_problem():
    cores = make_cores((3, 4), (4, 3), [5])
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        mpo_linear(x.double(), cores, None, backend="native")
    with pytest.raises(ValueError, match="must all be float32 or all bfloat16"):
        mpo_linear(x, [cores[0], cores[1].bfloat16()], None, backend="native")
    with pytest.raises(ValueError, match="must all be float32 or all bfloat16"):
        mpo_linear(x, [g.half() for g in cores], None, backend="native")
    with pytest.raises(ValueError, match="CPU-only"):
        native_impl.mpo_linear_native(x.to("meta"), cores, None)
    with pytest.raises(ValueError, match="bias must be floating point"):
        native_impl.mpo_linear_native(x, cores, torch.ones(12, dtype=torch.int64))
    # shape errors are caught by the shared validation before the backend runs
    with pytest.raises(ValueError, match="expect 12"):
        mpo_linear(torch.randn(2, 11), cores, None, backend="native")


@needs_native
def test_compiled_entry_checks_its_own_arguments():
    """The C++ entry must not trust its caller: bad shapes give an error, never a crash or a wrong result."""
    ext = native_impl._ext
    cores = make_cores((3, 4), (4, 3), [5])
    with pytest.raises(RuntimeError, match="bond mismatch"):
        ext.mpo_chain_forward(torch.randn(2, 12), [cores[0], cores[1][:4]], None, 1)
    with pytest.raises(RuntimeError, match="cores expect 12"):
        ext.mpo_chain_forward(torch.randn(2, 13), cores, None, 1)
    with pytest.raises(RuntimeError, match="gemm must be"):
        ext.mpo_chain_forward(torch.randn(2, 12), cores, None, 7)


def test_missing_extension_is_reported_not_crashing(monkeypatch):
    """Without the compiled module (TNK_NO_NATIVE=1 or a failed build) the backend says why and how to fix it."""
    monkeypatch.setattr(native_impl, "_ext", None)
    monkeypatch.setattr(native_impl, "_IMPORT_ERROR", "No module named 'tnkernels._native'")
    # dispatch caches availability per process; a process without the extension starts with an empty cache
    from tnkernels.ops import dispatch

    monkeypatch.setattr(dispatch, "_LOADED", {})
    ok, why = native_impl.is_available()
    assert not ok and "not built" in why and "TNK_NO_NATIVE" in why
    assert not native_impl.native_available()
    cores = make_cores((3, 4), (4, 3), [5])
    with pytest.raises(RuntimeError, match="not built"):
        native_impl.mpo_linear_native(torch.randn(2, 12), cores, None)
    with pytest.raises(RuntimeError, match="unavailable"):
        mpo_linear(torch.randn(2, 12), cores, None, backend="native")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_groups_match_reference(dtype):
    """A chain whose cheapest native schedule merges cores (big middle bond, several rows) still equals the
    reference; bf16 cores are merged in fp32."""
    in_modes, out_modes, bonds = (4, 6, 4), (6, 8, 6), [24, 24]
    cores = [g.to(dtype) for g in make_cores(in_modes, out_modes, bonds)]
    rows = 16
    groups, _ = native_impl.choose_groups(tuple(tuple(g.shape) for g in cores), rows)
    assert len(groups) < len(cores), f"expected a merge for this chain, got {groups}"
    x = torch.randn(rows, 96)
    bias = torch.randn(288)
    y = mpo_linear(x, cores, bias, backend="native")
    assert_close_rel(y, reference64(x, cores, bias), tolerance(torch.float32, "native"), f"groups {groups}")


@needs_native
def test_route_tuning_picks_a_route_and_stays_exact(monkeypatch):
    """Above the tuning threshold the first call times both GEMM routes and caches the winner; every call, the
    tuning one included, equals the reference."""
    monkeypatch.setattr(native_impl, "_TUNE_MIN_FLOPS", 1e5)  # tune this small chain too (keeps the test fast)
    cores = make_cores((8, 8, 8), (8, 8, 8), [16, 16])
    x = torch.randn(3, 512)
    native_impl._ROUTES.clear()
    with torch.inference_mode():
        first = mpo_linear(x, cores, None, backend="native")
        second = mpo_linear(x, cores, None, backend="native")
    routes = native_impl.route_cache()
    assert len(routes) == 1 and next(iter(routes.values())) in ("kernel", "aten")
    ref = reference64(x, cores, None)
    for y in (first, second):
        assert_close_rel(y, ref, tolerance(torch.float32, "native"), f"route {routes}")


def test_choose_groups_is_the_cheapest_grouping():
    """choose_groups must return the minimum over all groupings of its own cost: check against brute force for a
    chain where the plain sweep is not the cheapest."""
    shapes = ((1, 4, 6, 24), (24, 6, 8, 24), (24, 4, 6, 1))
    groups, cost = native_impl.choose_groups(shapes, 16)
    candidates = {
        ((0, 1), (1, 2), (2, 3)): native_impl._sweep_flops_shapes(shapes, 16),
    }
    for grouping in (((0, 2), (2, 3)), ((0, 1), (1, 3)), ((0, 3),)):
        c, merged = 0.0, []
        for a, b in grouping:
            if b - a == 1:
                merged.append(shapes[a])
            else:
                mc, m = native_impl._merge_cost(shapes[a:b])
                c += mc
                merged.append(m)
        candidates[grouping] = c + native_impl._sweep_flops_shapes(merged, 16)
    assert cost == min(candidates.values())
    assert candidates[groups] == cost
    assert cost < candidates[((0, 1), (1, 2), (2, 3))]


def test_sweep_flops_counts_each_step():
    """sweep_flops is what the planner reads: check it against a direct count for a 3-core chain."""
    cores = make_cores((2, 3, 4), (5, 6, 7), [3, 2])
    rows = 5
    expected = 2 * rows * (cores[0].numel() * (3 * 4) + cores[1].numel() * (5 * 4) + cores[2].numel() * (5 * 6))
    assert native_impl.sweep_flops(cores, rows) == expected


# ------------------------------------------------------------------------------------------ schedules and packs
@pytest.fixture
def fresh_packs():
    """Each test starts from an empty pack cache and the default budget, and leaves them so."""
    native_impl.clear_pack_cache()
    old = native_impl._PACK_BUDGET[0]
    yield
    native_impl.set_pack_budget(old)


@needs_native
def test_right_to_left_schedule_matches_reference(fresh_packs):
    """A chain the schedule sweeps from the right (reversed cores, x and y permuted by mode) equals the reference,
    with leading dims, with and without bias, for fp32 and bf16 inputs."""
    shapes = ((1, 8, 4, 6), (6, 16, 4, 6), (6, 12, 2, 1))
    direction, groups, _, cached = native_impl.choose_schedule(shapes, 3, 4, True)
    assert direction == "right" and cached, (direction, groups)
    cores = make_cores((8, 16, 12), (4, 4, 2), [6, 6])
    bias = torch.randn(32)
    for b in (bias, None):
        x = torch.randn(3, 1536)
        with torch.inference_mode():
            y = mpo_linear(x, cores, b, backend="native")
        assert_close_rel(y, reference64(x, cores, b), tolerance(torch.float32, "native"), "right-to-left")
    x3 = torch.randn(1, 3, 1536)  # leading dims, 3 rows in all
    with torch.no_grad():
        y3 = mpo_linear(x3, cores, bias, backend="native")
        yb = mpo_linear(x3.bfloat16(), cores, bias, backend="native")
    assert y3.shape == (1, 3, 32) and yb.dtype == torch.bfloat16
    assert_close_rel(y3, reference64(x3, cores, bias), tolerance(torch.float32, "native"), "right, lead dims")
    assert_close_rel(yb, reference64(x3.bfloat16(), cores, bias), tolerance(torch.bfloat16), "right, bf16 x")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_pack_is_reused_and_rebuilt_when_a_core_changes(fresh_packs, dtype):
    """The merged cores are built once per layer and rebuilt after an in-place change or a swapped .data."""
    native_impl.set_pack_budget(2.0)  # merged bf16 cores are stored in fp32: twice the bytes of bf16 cores
    cores = [g.to(dtype) for g in make_cores((4, 6, 4), (6, 8, 6), [24, 24])]
    shapes = tuple(tuple(g.shape) for g in cores)
    direction, groups, _, cached = native_impl.choose_schedule(shapes, 1, cores[0].element_size(), True)
    assert cached and len(groups) < len(cores), (direction, groups)
    x = torch.randn(1, 96)
    with torch.inference_mode():
        y1 = mpo_linear(x, cores, None, backend="native")
        pack = native_impl._PACKS[cores[0]].packs[(direction, groups, cached)]
        mpo_linear(x, cores, None, backend="native")
        assert native_impl._PACKS[cores[0]].packs[(direction, groups, cached)] is pack, "the pack must be reused"
    assert (
        0
        < native_impl.pack_cache_bytes()
        <= native_impl._PACK_BUDGET[0] * sum(g.numel() * g.element_size() for g in cores)
    )
    assert_close_rel(y1, reference64(x, cores, None), tolerance(torch.float32, "native"), "cached pack")
    cores[1].mul_(-2.0)  # in place: the version counter moves
    with torch.inference_mode():
        y2 = mpo_linear(x, cores, None, backend="native")
    assert_close_rel(y2, reference64(x, cores, None), tolerance(torch.float32, "native"), "after in-place change")
    param = torch.nn.Parameter(cores[2].clone(), requires_grad=False)
    cores[2] = param
    with torch.no_grad():
        mpo_linear(x, cores, None, backend="native")
        param.data = torch.randn_like(param)  # same tensor object and version, new storage
        y3 = mpo_linear(x, cores, None, backend="native")
    assert_close_rel(y3, reference64(x, cores, None), tolerance(torch.float32, "native"), "after .data swap")


@needs_native
def test_partly_kept_pack_merges_the_rest_per_call(fresh_packs):
    """When only some merged groups fit the budget, those are kept and the others merged on every call: the result
    equals the reference, the kept copy is reused, the bytes stay within the budget, and a change to a core whose
    group is merged per call is seen too."""
    cores = make_cores((8, 5, 2, 4), (6, 5, 5, 8), [28, 11, 32])
    direction, groups, _, kept = native_impl.choose_schedule(tuple(tuple(g.shape) for g in cores), 2, 4, True)
    merged = [gi for gi, (a, b) in enumerate(groups) if b - a > 1]
    assert direction == "left" and kept and any(gi not in kept for gi in merged), (direction, groups, kept)
    x = torch.randn(2, 320)
    bias = torch.randn(1200)
    with torch.inference_mode():
        y = mpo_linear(x, cores, bias, backend="native")
        stored = native_impl._PACKS[cores[0]].packs[(direction, groups, kept)]
        assert mpo_linear(x, cores, bias, backend="native").equal(y)
        assert native_impl._PACKS[cores[0]].packs[(direction, groups, kept)] is stored
    assert_close_rel(y, reference64(x, cores, bias), tolerance(torch.float32, "native"), f"kept {kept} of {groups}")
    assert 0 < native_impl.pack_cache_bytes() <= sum(4 * g.numel() for g in cores)
    per_call = next(gi for gi in merged if gi not in kept)
    cores[groups[per_call][0]].mul_(-1.5)
    with torch.inference_mode():
        y2 = mpo_linear(x, cores, bias, backend="native")
    assert_close_rel(y2, reference64(x, cores, bias), tolerance(torch.float32, "native"), "after a change")


@needs_native
def test_pack_cache_does_not_keep_a_layer_alive(fresh_packs):
    """The cache is keyed weakly on the first core; a pack that uses that core as is must not hold it, or the
    entry (and its merged copies) would outlive the layer."""
    import gc
    import weakref

    cores = make_cores((4, 6, 4), (6, 8, 6), [4, 24])
    direction, groups, _, cached = native_impl.choose_schedule(tuple(tuple(g.shape) for g in cores), 1, 4, True)
    assert cached and direction == "left" and groups[0] == (0, 1), (direction, groups, cached)  # core 0 as is
    with torch.inference_mode():
        mpo_linear(torch.randn(1, 96), cores, None, backend="native")
    assert len(native_impl._PACKS) == 1
    ref = weakref.ref(cores[0])
    del cores
    gc.collect()
    assert ref() is None and len(native_impl._PACKS) == 0


@needs_native
def test_zero_budget_keeps_no_pack_and_inference_tensors_are_not_cached(fresh_packs):
    cores = make_cores((4, 6, 4), (6, 8, 6), [24, 24])
    x = torch.randn(2, 96)
    native_impl.set_pack_budget(0.0)
    with torch.inference_mode():
        y = mpo_linear(x, cores, None, backend="native")
    assert native_impl.pack_cache_bytes() == 0
    assert_close_rel(y, reference64(x, cores, None), tolerance(torch.float32, "native"), "budget 0")
    native_impl.set_pack_budget(1.0)
    with torch.inference_mode():  # inference tensors have no version counter: never cached, changes always seen
        inf_cores = [g.clone() for g in cores]
        mpo_linear(x, inf_cores, None, backend="native")
        inf_cores[1].mul_(3.0)
        y = mpo_linear(x, inf_cores, None, backend="native")
    assert native_impl.pack_cache_bytes() == 0
    assert_close_rel(y, reference64(x, inf_cores, None), tolerance(torch.float32, "native"), "inference tensors")
    with torch.inference_mode():  # one inference core among normal ones is enough to disable the cache
        mixed = [cores[0], inf_cores[1], cores[2]]
        mpo_linear(x, mixed, None, backend="native")
        inf_cores[1].mul_(0.5)
        y = mpo_linear(x, mixed, None, backend="native")
    assert native_impl.pack_cache_bytes() == 0
    assert_close_rel(y, reference64(x, mixed, None), tolerance(torch.float32, "native"), "mixed cores")
    with pytest.raises(ValueError, match="factor must be >= 0"):
        native_impl.set_pack_budget(-1.0)


@needs_native
def test_random_schedules_match_reference(fresh_packs):
    """Random chains and row counts (1..16 and larger batches), fp32 and bf16 cores, budgets 0, 1 and 4: every
    schedule (left or right, merged or not, cached or merged per call) equals the float64 reference."""
    rng = random.Random(77)
    seen = set()
    for t in range(24):
        native_impl.set_pack_budget((0.0, 1.0, 4.0)[t % 3])
        n = rng.randint(1, 5)
        in_modes = [rng.randint(1, 7) for _ in range(n)]
        out_modes = [rng.randint(1, 7) for _ in range(n)]
        bonds = [rng.randint(1, 20) for _ in range(n - 1)]
        dtype = rng.choice([torch.float32, torch.bfloat16])
        cores = [g.to(dtype) for g in make_cores(in_modes, out_modes, bonds)]
        rows = rng.choice([1, 2, 3, 4, 5, 8, 16, 40])
        x = torch.randn(rows, math.prod(in_modes))
        bias = torch.randn(math.prod(out_modes)) if rng.random() < 0.5 else None
        schedule = native_impl.choose_schedule(tuple(g.shape for g in cores), rows, cores[0].element_size(), True)
        seen.add((schedule[0], len(schedule[1]) < n, bool(schedule[3])))
        with torch.inference_mode():
            y = mpo_linear(x, cores, bias, backend="native")
            y_again = mpo_linear(x, cores, bias, backend="native")  # the cached pack, if any
        what = f"modes {in_modes}->{out_modes} bonds {bonds} rows {rows} {dtype} schedule {schedule}"
        assert_close_rel(y, reference64(x, cores, bias), tolerance(torch.float32, "native"), what)
        assert torch.equal(y, y_again), what
    # the draw covers a right-to-left sweep, a cached merge and a merge paid per call
    assert {"right", "left"} == {s[0] for s in seen} and ("left", True, True) in seen, seen
    assert ("left", True, False) in seen, seen


@needs_native
def test_one_row_calls_over_big_cores_are_tuned(monkeypatch):
    """A one-row call is a matrix-vector product: over _TUNE_MIN_ROW1_BYTES of cores it is tuned even below
    _TUNE_MIN_FLOPS (ATen's GEMV can stream big cores faster than the kernel); a 2-row call of the same chain is not."""
    monkeypatch.setattr(native_impl, "_TUNE_MIN_ROW1_BYTES", 1000)  # a small chain stands in for a big one
    cores = make_cores((40, 1), (1, 24), [6])
    native_impl._ROUTES.clear()
    with torch.inference_mode():
        for rows in (1, 2):
            x = torch.randn(rows, 40)
            y = mpo_linear(x, cores, None, backend="native")
            assert_close_rel(y, reference64(x, cores, None), tolerance(torch.float32, "native"), f"{rows} rows")
    assert [key[1] for key in native_impl.route_cache()] == [1]

"""Planner choices, the plan cache, calibration on disk, explain(), options and structure choice."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tnkernels.plan.cache as plan_cache
from tnkernels.decompose import auto_modes
from tnkernels.ops.mpo.torch_impl import mpo_linear_torch
from tnkernels.plan import (
    Calibration,
    calibrate,
    choose_mpo_structure,
    clear_plans,
    explain,
    explain_tucker,
    mpo_decision,
    options,
    plan_stats,
    recalibrate,
    set_options,
    structure_candidates,
)
from tnkernels.plan.mpo import decide, einsum_plans, grouped_plans
from tnkernels.plan.structure import tt_error

CPU = torch.device("cpu")


def flat_calibration() -> Calibration:
    """Every GEMM at one rate, memory free, no call overhead: predicted time is proportional to FLOPs."""
    return Calibration("cpu", "torch.float32", 0.0, 1e30, {1: 1e10, 256: 1e10}, source="test")


def thin_penalty_calibration() -> Calibration:
    """Shaped like a real CPU: thin GEMMs slow, finite bandwidth, a few microseconds per call."""
    return Calibration("cpu", "torch.float32", 3e-6, 2e10, {1: 2e9, 4: 8e9, 16: 3e10, 64: 6e10, 256: 8e10})


@st.composite
def chains(draw):
    n = draw(st.integers(2, 4))
    shapes = []
    r = 1
    for k in range(n):
        i, j = draw(st.integers(2, 6)), draw(st.integers(2, 6))
        r1 = 1 if k == n - 1 else draw(st.integers(1, 24))
        shapes.append((r, i, j, r1))
        r = r1
    return tuple(shapes), draw(st.integers(1, 512))


@settings(max_examples=60, deadline=None)
@given(chain=chains())
def test_rebuild_when_every_chain_order_needs_more_flops_than_dense(chain):
    shapes, rows = chain
    cal = flat_calibration()
    plans = grouped_plans(cal, shapes, rows, 4) + einsum_plans(cal, shapes, rows, 4)
    rebuild = next(p for p in plans if p.kind == "rebuild")
    others = [p for p in plans if p.kind != "rebuild"]
    dec = decide(cal, shapes, rows, 4, needs_grad=False, recompute=False)
    if all(p.flops > rebuild.flops for p in others):
        assert dec.forward.kind == "rebuild", dec.alternatives
    # whatever wins, nothing considered beats it in predicted time
    assert dec.forward.seconds <= min(s for _, s in dec.alternatives) + 1e-15


def test_rebuild_chosen_with_realistic_calibration_for_a_fat_chain():
    # modes 4x4 / 4x4 with a full bond of 16: the chain does 8x the dense FLOPs
    shapes = ((1, 4, 4, 16), (16, 4, 4, 1))
    dec = decide(thin_penalty_calibration(), shapes, 256, 4, needs_grad=True, recompute=False)
    assert dec.forward.kind == "rebuild"
    assert dec.backward is not None and dec.backward.kind == "rebuild"


def test_chain_chosen_when_it_is_far_cheaper():
    # GPT-2 XL MLP at a high ratio: two thin cores; the chain needs ~1/40 of the dense FLOPs
    shapes = ((1, 40, 80, 8), (8, 40, 80, 1))
    dec = decide(thin_penalty_calibration(), shapes, 1024, 4, needs_grad=False, recompute=False)
    assert dec.forward.kind != "rebuild"
    assert dec.forward.seconds < dec.dense_seconds


def test_second_lookup_does_not_search(monkeypatch):
    clear_plans()
    calls = []
    real = plan_cache.decide

    def counting(*args, **kwargs):
        calls.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_cache, "decide", counting)
    cores = [torch.randn(1, 3, 5, 2), torch.randn(2, 7, 2, 1)]
    x = torch.randn(4, 21)
    before = plan_stats()
    mpo_linear_torch(x, cores, None)
    mpo_linear_torch(torch.randn(4, 21), cores, None)
    after = plan_stats()
    assert len(calls) == 1
    assert after["searches"] - before["searches"] == 1
    assert after["lookups"] - before["lookups"] == 2
    mpo_linear_torch(torch.randn(5, 21), cores, None)  # a new row count is a new key
    assert len(calls) == 2


def test_calibration_is_cached_on_disk_atomically_and_recalibrates(monkeypatch, tmp_path):
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    measured = []

    def fake_measure(device, dtype, rounds=3):
        measured.append(1)
        return Calibration(str(device), str(dtype), 1e-6 * len(measured), 1e10, {1: 1e9, 256: 1e11})

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    first = calibrate.get_calibration("cpu", torch.float32)
    assert len(measured) == 1 and first.overhead_s == 1e-6
    files = os.listdir(tmp_path)
    assert files == ["calibration.json"], files  # no temporary file left behind
    with open(tmp_path / "calibration.json") as f:
        assert len(json.load(f)) == 1
    monkeypatch.setattr(calibrate, "_MEMO", {})  # a new process: read from disk, do not measure
    again = calibrate.get_calibration("cpu", torch.float32)
    assert len(measured) == 1 and again.source == "disk" and again.overhead_s == first.overhead_s
    new = recalibrate("cpu", torch.float32)
    assert len(measured) == 2 and new.overhead_s == 2e-6
    assert calibrate.get_calibration("cpu", torch.float32).overhead_s == 2e-6
    monkeypatch.setattr(calibrate, "_MEMO", {})
    assert calibrate.get_calibration("cpu", torch.float32).overhead_s == 2e-6


def test_rate_interpolates_between_measured_points():
    cal = Calibration("cpu", "f", 0.0, 1.0, {1: 1e9, 16: 16e9})
    assert cal.rate(1) == 1e9 and cal.rate(16) == 16e9 and cal.rate(1000) == 16e9
    assert math.isclose(cal.rate(4), 4e9, rel_tol=1e-9)  # log-linear between the points


def test_gemm_rate_uses_the_role_of_the_smallest_dimension():
    cal = Calibration("cpu", "f", 0.0, 1.0, {1: 1e9, 256: 1e9}, n_rates={1: 2e9, 256: 2e9}, m_rates={1: 3e9, 256: 3e9})
    assert math.isclose(cal.gemm_rate(1000, 8, 1000), 1e9)  # small K
    assert math.isclose(cal.gemm_rate(1000, 1000, 8), 2e9)  # narrow output
    assert math.isclose(cal.gemm_rate(8, 1000, 1000), 3e9)  # few rows
    bare = Calibration("cpu", "f", 0.0, 1.0, {1: 1e9, 256: 1e9})  # an old calibration: one table for all
    assert math.isclose(bare.gemm_rate(1000, 1000, 8), 1e9) and math.isclose(bare.batched_rate(8), 1e9)


def test_fresh_pages_and_dram_price_huge_intermediates():
    # Same FLOPs, but the second calibration knows that a fresh 32 MiB+ tensor costs page faults and that
    # traffic beyond the cache streams from DRAM: a sweep whose intermediate is ~170 MB must cost more there.
    rates = {1: 1e11, 256: 1e11}
    flat = Calibration("cpu", "f", 0.0, 5e10, rates)
    real = Calibration("cpu", "f", 0.0, 5e10, rates, dram_bandwidth=1e10, fault_bandwidth=1e9)
    assert real.fresh_seconds((16 << 20,)) == 0.0  # below glibc's mmap threshold: reused heap memory
    assert math.isclose(real.fresh_seconds((64 << 20,)), (64 << 20) / 1e9)
    assert real.memory_seconds(1 << 20) == (1 << 20) / 5e10 and real.memory_seconds(1 << 30) == (1 << 30) / 1e10
    shapes = ((1, 64, 64, 64), (64, 64, 64, 1))
    sweep_flat = decide(flat, shapes, 1024, 4, needs_grad=False, recompute=False, force="sweep-left").forward
    sweep_real = decide(real, shapes, 1024, 4, needs_grad=False, recompute=False, force="sweep-left").forward
    assert sweep_real.seconds > 2 * sweep_flat.seconds
    assert decide(real, shapes, 1024, 4, needs_grad=False, recompute=False).forward.kind == "rebuild"


def test_calibration_from_an_older_version_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    key = calibrate._key(torch.device("cpu"), torch.float32)
    old = {"device": "cpu", "dtype": "torch.float32", "overhead_s": 1e-6, "bandwidth": 1e10, "rates": {"1": 1e9}}
    (tmp_path / "calibration.json").write_text(json.dumps({key: old}))
    fresh = Calibration("cpu", "torch.float32", 2e-6, 1e10, {1: 1e9, 256: 1e11}, dram_bandwidth=5e9)
    monkeypatch.setattr(calibrate, "measure", lambda device, dtype, rounds=3: fresh)
    assert calibrate.get_calibration("cpu", torch.float32).overhead_s == 2e-6
    stored = json.loads((tmp_path / "calibration.json").read_text())[key]
    assert stored["dram_bandwidth"] == 5e9


def test_convolutions_are_priced_at_their_measured_scale_of_the_gemm_rate():
    from tnkernels.plan.tucker import _conv

    rates = {1: 1e9, 256: 1e11}
    plain = Calibration("cpu", "f", 0.0, 1e30, rates)  # infinite bandwidth: every step compute-bound
    scaled = Calibration("cpu", "f", 0.0, 1e30, rates, conv_scale={"kxk": 2.0, "1x1": 0.5})
    args3 = ("core", 1, 64, 28, 28, 64, 3, 3, 28, 28, 4, False)
    args1 = ("u_in", 1, 128, 28, 28, 64, 1, 1, 28, 28, 4, False)
    assert _conv(scaled, *args3).seconds == pytest.approx(_conv(plain, *args3).seconds / 2)
    assert _conv(scaled, *args1).seconds == pytest.approx(_conv(plain, *args1).seconds * 2)
    assert plain.conv_rate_scale(9) == plain.conv_rate_scale(1) == 1.0  # not measured: the GEMM's rate


def test_conv_scale_is_the_measured_rate_over_the_gemm_rate_clamped(monkeypatch):
    # a flat GEMM rate of 1e11 FLOP/s; each probe convolution "takes" the time its FLOPs need at 2e11 (the 3x3) or
    # at 1e10 (the 1x1, below the clamp): scales 2.0 and 0.25
    cal = Calibration("cpu", "torch.float32", 0.0, 1e10, {1: 1e11, 256: 1e11})
    rate = {"1x1": 1e10, "kxk": 2e11}
    flops = {name: 2 * side * side * ci * k * k * co for name, (ci, co, k, side) in calibrate._CONV_PROBES.items()}
    seconds = {3: flops["kxk"] / rate["kxk"], 1: flops["1x1"] / rate["1x1"]}
    monkeypatch.setattr(calibrate, "_timeit", lambda fn, device, **kw: seconds[fn.__defaults__[2] * 2 + 1])
    scale = calibrate._measure_conv_scale(cal, torch.device("cpu"), torch.float32, rounds=1)
    assert scale == {"1x1": pytest.approx(0.25), "kxk": pytest.approx(2.0)}
    monkeypatch.undo()  # the real probes run and give a scale for both classes
    assert set(calibrate._measure_conv_scale(cal, torch.device("cpu"), torch.float32, rounds=1)) == {"1x1", "kxk"}


def test_explain_lists_steps_alternatives_and_memory():
    text = explain([(1, 8, 8, 4), (4, 8, 8, 4), (4, 8, 8, 1)], rows=32, needs_grad=True, top=100)
    assert "forward plan:" in text and "backward plan:" in text
    assert "alternatives considered" in text and "rebuild" in text and "einsum-dp" in text
    assert "caching the dense weight would cost" in text
    tucker = explain_tucker((2, 16, 8, 8), (16, 4), (4, 4, 3, 3), (16, 4), padding=(1, 1))
    for kind in ("three-convs", "fold-in", "fold-out", "dense"):
        assert kind in tucker


def test_explain_tucker_takes_ints_as_nn_conv2d_does():
    args = ((2, 16, 8, 8), (16, 4), (4, 4, 3, 3), (16, 4))
    assert explain_tucker(*args, stride=1, padding=1) == explain_tucker(*args, stride=(1, 1), padding=(1, 1))
    with pytest.raises(ValueError, match="explain_tucker: padding .*TuckerConv2d.explain"):
        explain_tucker(*args, padding="same")
    with pytest.raises(ValueError, match="explain_tucker: stride must be an int or a pair"):
        explain_tucker(*args, stride=(1, 1, 1))


def test_explain_takes_a_layer():
    from tnkernels.nn import MPOLinear

    layer = MPOLinear(24, 10, in_modes=(24, 1), out_modes=(1, 10), bonds=(3,))
    assert explain(layer, rows=5) == explain([tuple(g.shape) for g in layer.cores], rows=5)
    assert "MPO chain [(1, 24, 1, 3), (3, 1, 10, 1)], rows=5" in explain(layer, rows=5)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_layer_explain_names_what_the_call_runs(padding_mode, monkeypatch):
    """layer.explain(...) heads the plan with what runs: the backend `auto` resolves to for an MPOLinear, the plan
    kind a TuckerConv2d call takes (recorded from a real call here), on a padded input for padding modes."""
    from tnkernels.nn import MPOLinear, TuckerConv2d
    from tnkernels.ops import backend_available
    from tnkernels.ops.tucker import torch_impl

    layer = MPOLinear(64, 48, in_modes=(8, 8), out_modes=(6, 8), bonds=(5,))
    native = backend_available("mpo_linear", "native")[0]
    assert ("runs the native kernel" if native else "runs the torch backend's plan") in layer.explain(2)
    assert "at 512 rows, training: runs the torch backend's plan:\nMPO chain" in layer.explain(512, needs_grad=True)
    assert "runs the Triton kernels" in MPOLinear(
        64, 48, in_modes=(8, 8), out_modes=(6, 8), bonds=(5,), backend="triton"
    ).explain(2)
    conv = TuckerConv2d(8, 12, 3, ranks=(5, 4), padding=1, padding_mode=padding_mode)
    ran = []
    real = torch_impl._weights
    monkeypatch.setattr(torch_impl, "_weights", lambda kind, *a: ran.append(kind) or real(kind, *a))
    for needs_grad in (False, True):
        ran.clear()
        text = conv.explain((2, 8, 9, 9), needs_grad=needs_grad)
        x = torch.randn(2, 8, 9, 9, requires_grad=needs_grad)
        with torch.set_grad_enabled(needs_grad):
            conv(x)
        padded_first = padding_mode != "zeros"  # then the conv itself pads nothing
        assert ("x(2, 8, 11, 11)" if padded_first else "x(2, 8, 9, 9)") in text
        assert text.endswith(f"runs: {ran[0]}")
    with pytest.raises(ValueError, match="use layer.explain"):
        explain(conv, rows=4)


def test_explain_rejects_bad_input():
    with pytest.raises(ValueError, match="rows"):
        explain([(1, 2, 2, 1)], rows=0)
    with pytest.raises(ValueError, match="4 dimensions"):
        explain([(1, 2, 2)], rows=3)


def test_options_validate_and_restore():
    with pytest.raises(ValueError, match="force must be one of"):
        set_options(force="fastest")
    with pytest.raises(ValueError, match="tucker_force must be one of"):
        set_options(tucker_force="two-convs")
    with options(recompute=True, force="rebuild"):
        assert plan_cache.OPTIONS.recompute and plan_cache.OPTIONS.force == "rebuild"
    assert not plan_cache.OPTIONS.recompute and plan_cache.OPTIONS.force is None


def test_forced_kind_is_part_of_the_key():
    shapes = ((1, 4, 4, 2), (2, 4, 4, 2), (2, 4, 4, 1))
    kinds = set()
    for kind in ("sweep-left", "sweep-right", "merge", "rebuild", "einsum"):
        with options(force=kind):
            kinds.add(mpo_decision(shapes, 8, torch.float32, CPU, False).forward.kind)
    assert kinds == {"sweep-left", "sweep-right", "merge", "rebuild", "einsum"}


def test_modes_come_from_auto_modes_plus_the_low_rank_split():
    cands = structure_candidates(6400, 1600, 16, rows=64)
    assert [c.num_cores for c in cands][:2] == [2, 3]
    assert cands[0].in_modes == auto_modes(1600, 2) and cands[0].out_modes == auto_modes(6400, 2)
    assert not cands[0].is_low_rank
    low = [c for c in cands if c.is_low_rank]
    assert len(low) == 1 and (low[0].in_modes, low[0].out_modes) == ((1600, 1), (1, 6400))
    assert low[0].bonds == (6400 * 1600 // (16 * 8000),)  # the largest rank within dense / 16 parameters
    assert all(not c.is_low_rank for c in structure_candidates(6400, 1600, 16, rows=64, low_rank=False))
    # prime sizes: no balanced split, but the low-rank one exists
    only = structure_candidates(7, 13, 2)
    assert [(c.in_modes, c.out_modes, c.bonds) for c in only] == [((13, 1), (1, 7), (2,))]


def test_low_rank_chain_costs_dense_over_ratio_flops_so_speed_picks_it_at_moderate_ratios():
    # A balanced 2-core chain at ratio 2 costs more FLOPs than the dense product; the low-rank split costs half.
    for rows in (64, 1024):
        s = choose_mpo_structure(3072, 768, 2, rows=rows)
        assert s.is_low_rank, (rows, s)
        balanced = choose_mpo_structure(3072, 768, 2, rows=rows, low_rank=False)
        assert s.predicted_seconds < balanced.predicted_seconds


def test_tt_error_of_two_cores_is_the_truncated_svd_error():
    w = torch.randn(12, 10, dtype=torch.float64)
    in_modes, out_modes, bond = (5, 2), (4, 3), 3
    # site order: T[(i1 j1), (i2 j2)]
    t = w.reshape(4, 3, 5, 2).permute(2, 0, 3, 1).reshape(20, 6)
    s = torch.linalg.svdvals(t)
    expected = float(s[bond:].square().sum().sqrt() / s.square().sum().sqrt())
    assert math.isclose(tt_error(w, in_modes, out_modes, (bond,)), expected, rel_tol=1e-9)


def test_choose_structure_reaches_ratio_and_respects_prefer():
    w = torch.randn(96, 64)
    cands = structure_candidates(96, 64, 4, rows=64, weight=w)
    assert len(cands) >= 2
    for s in cands:
        assert s.params <= 96 * 64 / 4 and math.prod(s.in_modes) == 64 and math.prod(s.out_modes) == 96
    acc = choose_mpo_structure(96, 64, 4, rows=64, weight=w, prefer="accuracy")
    assert acc.rel_error == min(s.rel_error for s in cands)
    fast = choose_mpo_structure(96, 64, 4, rows=64, weight=w, prefer="speed", error_slack=1e9)
    assert fast.predicted_seconds == min(s.predicted_seconds for s in cands)
    two_core = next(s for s in cands if s.num_cores == 2)
    strict = choose_mpo_structure(96, 64, 4, rows=64, weight=w, prefer="speed", error_slack=0.0)
    assert strict.num_cores == 2 or strict.rel_error <= two_core.rel_error + 1e-12
    assert strict.predicted_seconds <= two_core.predicted_seconds


def test_speed_never_takes_a_structure_slower_than_dense_for_its_accuracy(monkeypatch):
    """A wide random layer: the balanced splits are more accurate than the low-rank one, but their chains cost
    more than the dense GEMM. prefer="speed" must take a structure no slower than dense (here the low-rank one;
    the old rule took the 3-core split, 1.02x dense, and on SmolLM's 576 x 49152 head a split 3.3x slower);
    prefer="accuracy" still takes the most accurate."""
    monkeypatch.setattr(calibrate, "_MEMO", {})
    calibrate.set_calibration(flat_calibration())  # predicted time proportional to FLOPs: machine-independent
    try:
        w = torch.nn.Linear(24, 1536).weight.detach()
        cands = structure_candidates(1536, 24, 4, rows=1024, weight=w)
        dense = mpo_decision(cands[0].core_shapes(), 1024, torch.float32, CPU, False).dense_seconds
        low = next(s for s in cands if s.is_low_rank)
        assert any(s.predicted_seconds > dense and s.rel_error * 1.05 < low.rel_error for s in cands)
        fast = choose_mpo_structure(1536, 24, 4, rows=1024, weight=w)
        assert fast.predicted_seconds <= dense and fast.is_low_rank
        accurate = choose_mpo_structure(1536, 24, 4, rows=1024, weight=w, prefer="accuracy")
        assert accurate.rel_error == min(s.rel_error for s in cands) and accurate.predicted_seconds > dense
    finally:
        clear_plans()  # the plans made under the flat calibration must not serve later tests


def test_choose_structure_errors():
    with pytest.raises(ValueError, match="prefer"):
        choose_mpo_structure(96, 64, 4, prefer="fast")
    with pytest.raises(ValueError, match="ratio must be > 1"):
        choose_mpo_structure(96, 64, 1)
    with pytest.raises(ValueError, match="expected"):
        choose_mpo_structure(96, 64, 4, weight=torch.randn(64, 96))
    with pytest.raises(ValueError, match="no MPO"):
        choose_mpo_structure(7, 13, 8)  # even rank 1 keeps 20 of 91 weights (4.55x)


def test_auto_backend_hook(monkeypatch):
    from tnkernels.ops import backend_available
    from tnkernels.plan import NATIVE_MAX_ROWS, auto_mpo_backend

    assert auto_mpo_backend("cpu", 1, torch.float32, needs_grad=True) == "torch"  # native is forward only
    assert auto_mpo_backend("cpu", NATIVE_MAX_ROWS + 1, torch.float32, needs_grad=False) == "torch"
    assert auto_mpo_backend("cpu", 1, torch.float64, needs_grad=False) == "torch"
    native = backend_available("mpo_linear", "native")[0]
    assert auto_mpo_backend("cpu", 1, torch.float32, needs_grad=False) == ("native" if native else "torch")
    # a low-rank chain is two BLAS GEMMs on the torch path, faster than the fused kernel (see backends.py)
    assert auto_mpo_backend("cpu", 1, torch.float32, needs_grad=False, low_rank=True) == "torch"
    triton = backend_available("mpo_linear", "triton")[0]
    # Triton is opt-in on CUDA until it has been checked on a GPU (see tnkernels/plan/backends.py).
    monkeypatch.delenv("TNK_AUTO_TRITON", raising=False)
    assert auto_mpo_backend("cuda", 64, torch.float32, needs_grad=True) == "torch"
    monkeypatch.setenv("TNK_AUTO_TRITON", "1")
    assert auto_mpo_backend("cuda", 64, torch.float32, needs_grad=True) == ("triton" if triton else "torch")


def test_auto_runs_a_low_rank_layer_on_the_torch_path(monkeypatch):
    import tnkernels.ops as ops
    from tnkernels import MPOLinear

    seen = []
    real = ops.resolve
    monkeypatch.setattr(ops, "resolve", lambda op, backend, dev: seen.append(backend) or real(op, backend, dev))
    layer = MPOLinear(12, 8, in_modes=(12, 1), out_modes=(1, 8), bonds=(3,))
    x = torch.randn(1, 12)
    with torch.no_grad():
        y = layer(x)
    assert seen == ["torch"]
    ref = x.double() @ layer.to_dense().double().t() + layer.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)

"""torch.func transforms as the first calls on a machine: an empty TNK_CACHE_DIR and empty memories.

The planner's one-time calibration (plan/calibrate.py) and, on a CPU, the Tucker kind timing (ops/tucker/tuned.py)
measure on random tensors, with requires_grad_ and backward. Made inside a transform they failed (before
2026-12-02): vmap with "called random operation while in randomness error mode", jacrev / grad with "attempting to
call Tensor.requires_grad_() ... inside of a function being transformed". They now run on a thread of their own,
outside the transform (calibrate.outside_transforms). Checked in float64 against the dense twin.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from tests.helpers import assert_close_rel
from tnkernels.nn import MPOLinear, TuckerConv2d
from tnkernels.ops import tucker_to_dense
from tnkernels.ops.tucker import tuned
from tnkernels.plan import cache, calibrate

F64 = torch.float64


@pytest.fixture
def cold_cache(monkeypatch, tmp_path):
    """A machine that has measured nothing: an empty cache folder, no calibration or plan or Tucker kind in
    memory, and the Tucker kinds timed (as on a user's CPU)."""
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TNK_TUCKER_TUNE", "1")
    monkeypatch.setattr(calibrate, "_MEMO", {})
    monkeypatch.setattr(tuned, "_MEMO", {})
    monkeypatch.setattr(cache, "_MPO_PLANS", {})
    monkeypatch.setattr(cache, "_TUCKER_PLANS", {})
    return tmp_path


def test_outside_transforms_runs_the_call_untransformed_and_hands_back_its_error():
    seen = []

    def probe(x):
        seen.append((torch._C._are_functorch_transforms_active(), torch.is_grad_enabled()))
        torch.randn(2).requires_grad_().sum().backward()  # all refused inside a transform
        return x

    def fail():
        raise KeyError("inside")

    def f(x):
        calibrate.outside_transforms(probe, 1)
        with pytest.raises(KeyError, match="inside"):
            calibrate.outside_transforms(fail)
        return x * 2

    with torch.no_grad():
        vmap(f, randomness="error")(torch.ones(3, 2))
    jacrev(f)(torch.ones(2))
    assert seen == [(False, True), (False, True)]
    calibrate.outside_transforms(probe, 1)  # outside a transform: run here, in this thread's modes
    assert seen[-1] == (False, True)


def test_mpo_vmap_on_a_cold_cache(cold_cache):
    lin = nn.Linear(24, 20, dtype=F64)
    layer = MPOLinear.from_linear(lin, in_modes=(4, 6), out_modes=(4, 5), max_bond=20)  # full bond: exact
    x = torch.randn(3, 5, 24, dtype=F64)
    assert_close_rel(vmap(layer)(x), lin(x), 1e-10, "vmap")
    assert (cold_cache / "calibration.json").exists()  # the calibration ran, inside the vmap


@pytest.mark.parametrize("transform", ["vmap", "jacrev", "grad"])
def test_tucker_transforms_on_a_cold_cache(cold_cache, transform):
    """The first call of the layer, inside the transform: the calibration and the kind timing (with a gradient
    under jacrev and grad) run there."""
    conv = nn.Conv2d(6, 8, 3, padding=1, dtype=F64)
    layer = TuckerConv2d.from_conv(conv, ranks=(5, 4))
    twin = layer.to_conv()
    if transform == "vmap":
        xb = torch.randn(3, 2, 6, 7, 7, dtype=F64)
        assert_close_rel(vmap(layer)(xb), twin(xb.flatten(0, 1)).view(3, 2, 8, 7, 7), 1e-10, "vmap")
    elif transform == "jacrev":
        xs = torch.randn(1, 6, 5, 5, dtype=F64)
        assert_close_rel(jacrev(layer)(xs), jacrev(twin)(xs), 1e-10, "jacrev")
    else:
        x = torch.randn(2, 6, 9, 9, dtype=F64)
        params = {k: v.detach() for k, v in layer.named_parameters()}
        got = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        out = F.conv2d(x, tucker_to_dense(leaves["u_out"], leaves["core"], leaves["u_in"]), leaves["bias"], 1, 1)
        want = torch.autograd.grad(out.square().sum(), list(leaves.values()))
        for name, g in zip(leaves, want, strict=True):
            assert_close_rel(got[name], g, 1e-10, f"grad {name}")
    assert (cold_cache / "calibration.json").exists() and (cold_cache / "tucker_kinds-v2.json").exists()

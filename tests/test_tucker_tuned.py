"""ops/tucker/tuned.py: the Tucker plan kind timed per machine on a CPU. Its cache (memory and disk), what turns
it off, the margin over the cost model's pick, and a layer running on the measured kind against float64.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import assert_close_rel, tolerance
from tnkernels.ops.tucker import tuned
from tnkernels.ops.tucker.reference import tucker_conv2d_reference
from tnkernels.plan import options
from tnkernels.plan.calibrate import machine_key

SHAPES = ((2, 6, 9, 9), (6, 3), (4, 3, 3, 3), (5, 4))  # x, U_in, core, U_out
CONV = ((1, 1), (1, 1), (1, 1))


def test_measured_once_then_remembered_and_stored(tucker_timing, monkeypatch):
    calls = []

    def fake_measure(shapes, conv, dtype, needs_grad, kinds, pick):
        calls.append((shapes, needs_grad, tuple(kinds), pick))
        return "fold-out"

    monkeypatch.setattr(tuned, "measure", fake_measure)
    cpu = torch.device("cpu")
    assert tuned.kind_for(SHAPES, CONV, torch.float32, cpu, True) == "fold-out"
    assert tuned.kind_for(SHAPES, CONV, torch.float32, cpu, True) == "fold-out"
    assert len(calls) == 1 and calls[0][1] is True and calls[0][3] in calls[0][2]  # the model's pick is a candidate
    stored = json.loads((tucker_timing / "tucker_kinds-v2.json").read_text())
    assert list(stored) == [machine_key()] and list(stored[machine_key()].values()) == ["fold-out"]
    monkeypatch.setattr(tuned, "_MEMO", {})  # a new process: read from disk, not measured again
    assert tuned.kind_for(SHAPES, CONV, torch.float32, cpu, True) == "fold-out" and len(calls) == 1
    big = ((64, *SHAPES[0][1:]), *SHAPES[1:])  # a batch past MAX_BATCH is timed (and remembered) at MAX_BATCH
    tuned.kind_for(big, CONV, torch.float32, cpu, False)
    tuned.kind_for(((32, *SHAPES[0][1:]), *SHAPES[1:]), CONV, torch.float32, cpu, False)
    assert len(calls) == 2 and calls[1][0][0][0] == tuned.MAX_BATCH
    tuned.forget()
    tuned.kind_for(SHAPES, CONV, torch.float32, cpu, True)
    assert len(calls) == 3


def test_off_switches_keep_the_models_pick(tucker_timing, monkeypatch):
    monkeypatch.setattr(tuned, "measure", lambda *a: pytest.fail("measured although tuning is off"))
    cpu = torch.device("cpu")
    with options(tucker_force="dense"):  # a forced kind wins over both
        assert tuned.kind_for(SHAPES, CONV, torch.float32, cpu, False) == "dense"
    monkeypatch.setenv("TNK_TUCKER_TUNE", "0")
    model_pick = tuned.tucker_decision(SHAPES, CONV, torch.float32, cpu, False).kind
    assert tuned.kind_for(SHAPES, CONV, torch.float32, cpu, False) == model_pick


def test_another_kind_replaces_the_pick_only_when_clearly_faster(monkeypatch):
    times = {"three-convs": 1.0, "fold-in": 0.97, "fold-out": 0.90}
    # measure() times `lambda k=kind: ...`: the fake reads the kind from the lambda's default
    monkeypatch.setattr(tuned, "_timeit", lambda fn, device, **kwargs: times[fn.__defaults__[0]])

    def run(kinds, pick):
        return tuned.measure(SHAPES, CONV, torch.float32, False, kinds, pick)

    assert run(["three-convs", "fold-in"], "three-convs") == "three-convs"  # 3% faster: within the margin
    assert run(["three-convs", "fold-in", "fold-out"], "three-convs") == "fold-out"  # 10% faster


@pytest.mark.parametrize("needs_grad", [False, True])
def test_layer_on_the_measured_kind_matches_float64(tucker_timing, needs_grad):
    from torch import nn

    from tnkernels import TuckerConv2d

    torch.manual_seed(0)
    layer = TuckerConv2d.from_conv(nn.Conv2d(6, 5, 3, padding=1), ranks=(3, 4), backend="torch")
    x = torch.randn(2, 6, 9, 9, requires_grad=needs_grad)
    params = [layer.u_in, layer.core, layer.u_out, layer.bias]
    with torch.set_grad_enabled(needs_grad):
        y = layer(x)
    ref_leaves = [t.detach().double().requires_grad_(needs_grad) for t in (x, *params)]
    x64, u_in, core, u_out, bias = ref_leaves
    ref = tucker_conv2d_reference(x64, u_in, core, u_out, bias, stride=1, padding=1)
    assert_close_rel(y, ref, tolerance(torch.float32), "forward")
    assert len(tuned._MEMO) == 1  # the kind was measured for this call
    if needs_grad:
        dy = torch.randn(ref.shape)
        got = torch.autograd.grad(y, [x, *params], dy)
        want = torch.autograd.grad(ref, ref_leaves, dy.double())
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close_rel(a, b, tolerance(torch.float32), f"gradient {k}")

"""The layers' inference memo (tnkernels/nn/call_memo.py): repeated no-grad calls of MPOLinear and
TuckerConv2d skip the routing, and give the float64 reference's result whatever happens to the layer between
calls."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tnkernels.nn.mpo_linear as mpo_linear_module
import tnkernels.nn.tucker_conv as tucker_conv_module
from tests.helpers import assert_close_rel
from tnkernels import MPOLinear, TuckerConv2d, mpo_to_dense
from tnkernels.nn.call_memo import MAX_ENTRIES
from tnkernels.plan import options


def _low_rank(in_f=48, out_f=40, rank=6, bias=True, dtype=torch.float32):
    layer = MPOLinear(in_f, out_f, in_modes=(in_f, 1), out_modes=(1, out_f), bonds=(rank,), bias=bias, dtype=dtype)
    with torch.no_grad():
        for g in layer.cores:
            g.normal_()
    return layer


def _reference(layer: MPOLinear, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b in float64, W rebuilt from the cores by an independent einsum."""
    g1, g2 = (g.detach().double() for g in layer.cores)
    w = torch.einsum("aipr,rjqb->jqip", g1, g2).reshape(layer.out_features, layer.in_features)
    y = x.double() @ w.t()
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.fixture
def full_path_calls(monkeypatch):
    """How many calls went the full path (run_mpo_linear) rather than through the memo."""
    calls = []
    real = mpo_linear_module.run_mpo_linear

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(mpo_linear_module, "run_mpo_linear", counting)
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3), ()])
@pytest.mark.parametrize("rank", [3, 12])  # the native thin kernels apply at rank <= 8, torch above
def test_memo_hits_and_matches_the_reference(full_path_calls, bias, lead, rank):
    layer = _low_rank(rank=rank, bias=bias)
    x = torch.randn(*lead, layer.in_features)
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
        third = layer(x * 2)
    assert len(full_path_calls) == 1, "the second and third calls with the same input shape should skip routing"
    assert_close_rel(first, _reference(layer, x), 1e-5, "first call")
    assert_close_rel(second, _reference(layer, x), 1e-5, "memo call")
    assert_close_rel(third, _reference(layer, x * 2), 1e-5, "memo call, new data")
    assert second.shape == (*lead, layer.out_features)


def test_memo_follows_changes_to_the_cores(full_path_calls):
    layer = _low_rank()
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        layer(x)
        layer.cores[0].mul_(3.0)  # in place: the memo's views see it
        assert_close_rel(layer(x), _reference(layer, x), 1e-5, "after an in-place update")
        assert len(full_path_calls) == 1
        layer.cores[1] = nn.Parameter(torch.randn_like(layer.cores[1]))  # replaced
        assert_close_rel(layer(x), _reference(layer, x), 1e-5, "after replacing a core")
        layer.cores[0].data = torch.randn_like(layer.cores[0])  # re-pointed
        assert_close_rel(layer(x), _reference(layer, x), 1e-5, "after .data =")
        layer.bias = nn.Parameter(torch.randn(layer.out_features))  # the bias is read on every call
        assert_close_rel(layer(x), _reference(layer, x), 1e-5, "after replacing the bias")
    assert len(full_path_calls) == 3  # each change of the cores sent one call down the full path


def test_memo_follows_dtype_changes_and_planner_options(full_path_calls):
    layer = _low_rank()
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        layer(x)
        with options(force="einsum"):  # another route: the memo must not keep answering "low-rank"
            assert_close_rel(layer(x), _reference(layer, x), 1e-5, "forced einsum")
            assert len(layer._memo_for_calls) == 1
        assert_close_rel(layer(x), _reference(layer, x), 1e-5, "after the options")
        layer.double()
        y = layer(x.double())
    assert y.dtype == torch.float64
    assert_close_rel(y, _reference(layer, x), 1e-12, "after .double()")
    assert len(full_path_calls) == 4


def test_memo_knows_other_routes(full_path_calls):
    balanced = MPOLinear(24, 30, in_modes=(4, 6), out_modes=(5, 6), bonds=(5,))  # not a low-rank chain
    x = torch.randn(3, 24)
    with torch.no_grad():
        for _ in range(3):
            assert_close_rel(balanced(x), _reference_chain(balanced, x), 1e-5, "balanced chain")
    assert len(full_path_calls) == 3  # known "not low-rank": every call takes the full path, without re-learning
    assert len(balanced._memo_for_calls) == 1


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_training_calls_through_the_memo_match_autograd_of_the_reference(full_path_calls, recompute, lead):
    layer = _low_rank(rank=5)
    leaves64 = [g.detach().double().requires_grad_() for g in (*layer.cores, layer.bias)]
    with options(recompute=recompute):
        for step in range(3):
            x = torch.randn(*lead, layer.in_features, requires_grad=True)
            dy = torch.randn(*lead, layer.out_features)
            for p in layer.parameters():
                p.grad = None
            layer(x).backward(dy)
            x64 = x.detach().double().requires_grad_()
            w = torch.einsum("aipr,rjqb->jqip", leaves64[0], leaves64[1]).reshape(layer.out_features, -1)
            want = torch.autograd.grad(x64 @ w.t() + leaves64[2], [x64, *leaves64], dy.double())
            got = [x.grad, *(p.grad for p in (*layer.cores, layer.bias))]
            for k, (g, e) in enumerate(zip(got, want, strict=True)):
                assert_close_rel(g, e, 1e-5, f"step {step}: gradient of leaf {k}")
    assert len(full_path_calls) == 1  # the later steps skipped the routing


def test_memo_keys_on_what_needs_grad(full_path_calls):
    layer = _low_rank()
    x = torch.randn(4, layer.in_features)
    y_train = layer(x)  # grad mode, cores require grad: the autograd route
    assert y_train.grad_fn is not None
    for p in layer.parameters():
        p.requires_grad_(False)
    y_frozen = layer(x)  # grad mode, nothing requires grad: the no-grad route
    assert y_frozen.grad_fn is None
    assert_close_rel(y_frozen, _reference(layer, x), 1e-5, "frozen layer in grad mode")
    for p in layer.parameters():
        p.requires_grad_(True)
    assert layer(x).grad_fn is not None
    assert len(full_path_calls) == 2 and len(layer._memo_for_calls) == 2


def _reference_chain(layer, x):
    w = mpo_to_dense([g.detach().double() for g in layer.cores])
    return x.double() @ w.t() + layer.bias.double()


def test_memo_keeps_clear_errors_and_stays_bounded():
    layer = _low_rank()
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))
        with pytest.raises(ValueError, match="in_features=48"):
            layer(torch.randn(2, layer.in_features + 1))
        for rows in range(1, 80):
            layer(torch.randn(rows, layer.in_features))
    assert 0 < len(layer._memo_for_calls) <= MAX_ENTRIES


def test_memo_is_not_part_of_the_saved_layer():
    layer = _low_rank()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer(x)
    assert len(layer._memo_for_calls) == 1
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert len(clone._memo_for_calls) == 0
        with torch.no_grad():
            assert_close_rel(clone(x), _reference(layer, x), 1e-5, "copied layer")
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert_close_rel(loaded(x), _reference(layer, x), 1e-5, "torch.save / torch.load")


# ------------------------------------------------------------------------------------------------- TuckerConv2d
def _tucker(c_in=6, c_out=5, ranks=(3, 4), bias=True, **conv):
    layer = TuckerConv2d(c_in, c_out, 3, ranks=ranks, bias=bias, **conv)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def _tucker_reference(layer: TuckerConv2d, x: torch.Tensor) -> torch.Tensor:
    w = torch.einsum("or,rsyx,is->oiyx", *(t.detach().double() for t in (layer.u_out, layer.core, layer.u_in)))
    b = layer.bias.detach().double() if layer.bias is not None else None
    return F.conv2d(x.double(), w, b, layer.stride, layer.padding, layer.dilation)


@pytest.fixture
def tucker_full_path_calls(monkeypatch):
    calls = []
    real = tucker_conv_module.tucker_conv2d

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(tucker_conv_module, "tucker_conv2d", counting)
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv", [dict(padding=1), dict(stride=2, padding="valid"), dict(padding="same", dilation=2)])
@pytest.mark.parametrize("kind", [None, "three-convs", "fold-in", "fold-out", "dense"])
def test_tucker_memo_hits_and_matches_the_reference(tucker_full_path_calls, bias, conv, kind):
    layer = _tucker(bias=bias, **conv)
    x = torch.randn(2, 6, 9, 8)
    with torch.no_grad(), options(tucker_force=kind):
        first = layer(x)
        second = layer(x)
        layer.core.mul_(-2.0)  # in place: a folded weight must be rebuilt from the new values, views follow
        third = layer(x)
    assert len(tucker_full_path_calls) == 1
    assert_close_rel(first, second, 1e-6, "memo call")
    assert_close_rel(third, _tucker_reference(layer, x), 1e-5, f"memo call after an in-place update ({kind})")


@pytest.mark.parametrize("kind", [None, "three-convs", "fold-in", "fold-out", "dense"])
@pytest.mark.parametrize("recompute", [False, True])
def test_tucker_training_calls_through_the_memo_match_the_reference(tucker_full_path_calls, kind, recompute):
    layer = _tucker(bias=True, padding=1).double()
    x = torch.randn(2, 6, 7, 6, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.parameters()]
    with options(tucker_force=kind, recompute=recompute):  # entering options changes the plan generation
        for step in range(3):  # the first call takes the full path, the others the memo; an update in between
            y = layer(x)
            dy = torch.randn_like(y)
            got = torch.autograd.grad(y, params, dy)
            w = torch.einsum("or,rsyx,is->oiyx", layer.u_out, layer.core, layer.u_in)  # float64, differentiable
            want = torch.autograd.grad(F.conv2d(x, w, layer.bias, layer.stride, layer.padding), params, dy)
            for k, (a, e) in enumerate(zip(got, want, strict=True)):
                assert_close_rel(a, e, 1e-9, f"step {step}, gradient {k} ({kind})")
            with torch.no_grad():
                layer.core.mul_(0.5)
        assert len(tucker_full_path_calls) == 1
        with torch.no_grad():  # no-grad calls have their own route
            layer(x)
        x.requires_grad_(False)
        layer.requires_grad_(False)  # nothing needs a gradient: the same no-grad route, even in grad mode
        layer(x)
    assert len(tucker_full_path_calls) == 2


def test_tucker_memo_follows_replaced_parameters_and_options(tucker_full_path_calls):
    layer = _tucker(padding=1)
    x = torch.randn(1, 6, 7, 7)
    with torch.no_grad():
        layer(x)
        layer.u_in = nn.Parameter(torch.randn_like(layer.u_in))
        assert_close_rel(layer(x), _tucker_reference(layer, x), 1e-5, "after replacing u_in")
        layer.u_out.data = torch.randn_like(layer.u_out)
        assert_close_rel(layer(x), _tucker_reference(layer, x), 1e-5, "after .data =")
        with options(tucker_force="dense"):
            assert_close_rel(layer(x), _tucker_reference(layer, x), 1e-5, "forced dense")
        layer.bias = nn.Parameter(torch.randn(5))
        assert_close_rel(layer(x), _tucker_reference(layer, x), 1e-5, "after replacing the bias")
        assert len(tucker_full_path_calls) == 5  # replaced, re-pointed, options on, options off; the bias is not kept
        with pytest.raises(ValueError, match="input has 4 channels"):
            layer(torch.randn(1, 4, 7, 7))
    clone = pickle.loads(pickle.dumps(layer))
    assert len(layer._memo_for_calls) > 0 and len(clone._memo_for_calls) == 0


def test_a_call_that_raises_is_not_remembered():
    layer = _low_rank()
    x = torch.randn(3, layer.in_features, dtype=torch.float64)  # float32 cores: refused
    for _ in range(2):
        with torch.no_grad(), pytest.raises(ValueError, match="input is torch.float64"):
            layer(x)
    assert len(layer._memo_for_calls) == 0

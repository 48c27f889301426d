"""MPOLinear's inference memo (tnkernels/nn/inference_memo.py): repeated no-grad calls skip the routing, and give
the float64 reference's result whatever happens to the layer between calls."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import tnkernels.nn.mpo_linear as mpo_linear_module
from tests.helpers import assert_close_rel
from tnkernels import MPOLinear, mpo_to_dense
from tnkernels.nn.inference_memo import MAX_ENTRIES
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
            assert len(layer._inference_memo) == 1
        assert_close_rel(layer(x), _reference(layer, x), 1e-5, "after the options")
        layer.double()
        y = layer(x.double())
    assert y.dtype == torch.float64
    assert_close_rel(y, _reference(layer, x), 1e-12, "after .double()")
    assert len(full_path_calls) == 4


def test_memo_knows_other_routes_and_training_ignores_it(full_path_calls):
    balanced = MPOLinear(24, 30, in_modes=(4, 6), out_modes=(5, 6), bonds=(5,))  # not a low-rank chain
    x = torch.randn(3, 24)
    with torch.no_grad():
        for _ in range(3):
            assert_close_rel(balanced(x), _reference_chain(balanced, x), 1e-5, "balanced chain")
    assert len(full_path_calls) == 3  # known "not low-rank": every call takes the full path, without re-learning
    assert len(balanced._inference_memo) == 1

    layer = _low_rank()
    x = torch.randn(4, layer.in_features, requires_grad=True)
    with torch.no_grad():
        layer(x)
    layer(x).sum().backward()  # grad mode: the planned autograd.Function, not the memo
    assert x.grad is not None and layer.cores[0].grad is not None
    assert len(full_path_calls) == 5


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
    assert 0 < len(layer._inference_memo) <= MAX_ENTRIES


def test_memo_is_not_part_of_the_saved_layer():
    layer = _low_rank()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer(x)
    assert len(layer._inference_memo) == 1
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert len(clone._inference_memo) == 0
        with torch.no_grad():
            assert_close_rel(clone(x), _reference(layer, x), 1e-5, "copied layer")
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert_close_rel(loaded(x), _reference(layer, x), 1e-5, "torch.save / torch.load")

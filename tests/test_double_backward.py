"""Gradients of gradients (create_graph=True: gradient penalties, MAML, Hessian-vector products).

The planned backward passes run on detached operands, saved intermediates and native kernels, which autograd
treats as constants: differentiating their results once more silently lost terms (the second derivative with
respect to a core came out as None or wrong; found 2026-12-02). Under create_graph every layer now differentiates
a re-run of its forward instead. Checked here in float64 against autograd through the dense reference, for every
plan kind and backend that trains: the gradient of ||d loss / d x||^2 with respect to the input and every
parameter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_close_rel
from tnkernels.nn import MPOLinear, TuckerConv2d
from tnkernels.ops import backend_available
from tnkernels.ops.mpo import torch_low_rank
from tnkernels.plan import options

F64 = torch.float64


def second_order(layer: nn.Module, forward, x: torch.Tensor) -> list[torch.Tensor | None]:
    """d/d(x, params) of ||d sum(f(x)^2) / dx||^2, where f is `forward` (the layer or its dense reference)."""
    x = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(forward(x).square().sum(), x, create_graph=True)
    leaves = [x, *layer.parameters()]
    return list(torch.autograd.grad(gx.square().sum(), leaves, allow_unused=True))


def check(layer: nn.Module, reference, x: torch.Tensor, what: str) -> None:
    got, want = second_order(layer, layer, x), second_order(layer, reference, x)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:
            assert g is None or not g.any(), f"{what}: {name}"
            continue
        assert g is not None, f"{what}: no second-order gradient for {name}"
        assert_close_rel(g, w, 1e-9, f"{what}: {name}")


@pytest.mark.parametrize("kind", ["sweep-left", "sweep-right", "merge", "rebuild", "einsum"])
@pytest.mark.parametrize("recompute", [False, True])
def test_mpo_chain_every_plan_kind(kind, recompute):
    lin = nn.Linear(24, 30, dtype=F64)
    layer = MPOLinear.from_linear(lin, in_modes=(2, 3, 4), out_modes=(3, 5, 2), max_bond=3, backend="torch")

    def reference(x):
        return x @ layer.to_dense().t() + layer.bias

    with options(force=kind, recompute=recompute):
        check(layer, reference, torch.randn(5, 24, dtype=F64), f"{kind}, recompute={recompute}")


@pytest.mark.parametrize("cpp", [False, True])
def test_low_rank_python_and_cpp_functions(cpp, monkeypatch):
    if cpp and not torch_low_rank._HAS_CPP:
        pytest.skip("native extension not built")
    monkeypatch.setattr(torch_low_rank, "cpp_enabled", cpp)
    lin = nn.Linear(16, 12, dtype=F64)
    layer = MPOLinear.from_linear(lin, in_modes=(16, 1), out_modes=(1, 12), max_bond=3, backend="torch")

    def reference(x):
        return x @ layer.to_dense().t() + layer.bias

    check(layer, reference, torch.randn(4, 16, dtype=F64), f"low rank, cpp={cpp}")


@pytest.mark.parametrize("kind", ["three-convs", "fold-in", "fold-out", "dense"])
@pytest.mark.parametrize("recompute", [False, True])
def test_tucker_every_plan_kind(kind, recompute):
    conv = nn.Conv2d(3, 4, 3, stride=(1, 2), padding=1, dtype=F64)
    layer = TuckerConv2d.from_conv(conv, ranks=(2, 2), backend="torch")

    def reference(x):
        return F.conv2d(x, layer.to_dense(), layer.bias, (1, 2), 1)

    with options(tucker_force=kind, recompute=recompute):
        check(layer, reference, torch.randn(2, 3, 5, 6, dtype=F64), f"{kind}, recompute={recompute}")


@pytest.mark.parametrize("op", ["mpo_linear", "tucker_conv2d"])
def test_triton_refuses_double_backward_loudly(op):
    ok, why = backend_available(op, "triton")
    if not ok:
        pytest.skip(why)
    if op == "mpo_linear":
        layer = MPOLinear(8, 6, in_modes=(2, 4), out_modes=(3, 2), bonds=(2,), backend="triton")
        x = torch.randn(3, 8, requires_grad=True)
    else:
        layer = TuckerConv2d(3, 4, 3, ranks=(2, 2), padding=1, backend="triton")
        x = torch.randn(1, 3, 4, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        torch.autograd.grad(gx.square().sum(), list(layer.parameters()), allow_unused=True)

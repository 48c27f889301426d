"""Mixed precision (torch.autocast): the layers compute in autocast's dtype, as nn.Linear and nn.Conv2d do.

Until 2026-12-02 every training step under autocast failed inside the planned Functions (autocast cast some
products and not others, and the backward, which runs outside autocast, met mixed dtypes). Now the operands are
cast to autocast's dtype before the Functions, which run with autocast off. Checked here against the float64
dense reference at half-precision tolerances: output dtype as the dense layer's, float32 gradients for the
float32 parameters and input, twice per layer (the second call is the one a call memo would serve).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_close_rel
from tnkernels.nn import MPOLinear, TuckerConv2d
from tnkernels.ops import mpo_to_dense, tucker_to_dense

# bf16 keeps 8 bits of mantissa, fp16 11: one rounding of operands and output, summed over short products
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def layer_and_input(which: str):
    if which == "tucker":
        layer = TuckerConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), ratio=2)
        return layer, nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 6, 6)
    lin = nn.Linear(24, 30)
    if which == "chain":
        return MPOLinear.from_linear(lin, in_modes=(2, 3, 4), out_modes=(3, 5, 2), max_bond=3), lin, torch.randn(5, 24)
    return MPOLinear.from_linear(lin, ratio=2), lin, torch.randn(5, 24)


def reference(layer: nn.Module, x: torch.Tensor, params: dict) -> torch.Tensor:
    if isinstance(layer, TuckerConv2d):
        w = tucker_to_dense(params["u_out"], params["core"], params["u_in"])
        return F.conv2d(x, w, params["bias"], 1, 1)
    cores = [params[f"cores.{k}"] for k in range(len(layer.cores))]
    return x @ mpo_to_dense(cores).t() + params["bias"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("which", ["chain", "low-rank", "tucker"])
def test_training_and_inference_under_autocast(which, dtype):
    layer, dense, x = layer_and_input(which)
    params64 = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    x64 = x.double().requires_grad_()
    want = reference(layer, x64, params64)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x64, *params64.values()], grad_out)
    tol = TOLERANCE[dtype]
    for call in range(2):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y = layer(leaf)
            assert y.dtype == dense(x).dtype == dtype
        assert_close_rel(y.double(), want, tol, f"{which}, call {call}: output")
        grads = torch.autograd.grad(y, [leaf, *layer.parameters()], grad_out.to(dtype))
        for name, g, w in zip(["x", *params64], grads, want_grads, strict=True):
            assert g.dtype == torch.float32, f"{which}: grad {name} is {g.dtype}"
            assert_close_rel(g.double(), w, 2 * tol, f"{which}, call {call}: grad {name}")
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):  # inference: the no-grad routes and kernels
            y = layer(x)
        assert y.dtype == dtype
        assert_close_rel(y.double(), want.detach(), tol, f"{which}, call {call}: no-grad output")

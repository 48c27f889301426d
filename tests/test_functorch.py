"""torch.func transforms (vmap, grad, jacrev, jvp) over the layers: per-sample gradients, Jacobians, batched calls.

The planned autograd Functions and the native kernels cannot run under these transforms, so the layers take plain
differentiable torch ops there (tnkernels.ops.modes.under_transform_or_dual). Before (2026-12-02) every transform
failed inside the layer with PyTorch's "must override the setup_context staticmethod". Checked in float64 against
the same transform over the dense reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from tests.helpers import assert_close_rel
from tnkernels.nn import MPOLinear, TuckerConv2d
from tnkernels.ops import mpo_to_dense, tucker_to_dense

F64 = torch.float64


def mpo_layer(low_rank: bool) -> MPOLinear:
    lin = nn.Linear(12, 20, dtype=F64)
    if low_rank:
        return MPOLinear.from_linear(lin, in_modes=(12, 1), out_modes=(1, 20), max_bond=3)
    return MPOLinear.from_linear(lin, in_modes=(3, 4), out_modes=(4, 5), max_bond=3)


def tucker_layer() -> TuckerConv2d:
    return TuckerConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1, dtype=F64), ranks=(2, 2))


def dense_twin(layer: nn.Module) -> nn.Module:
    """nn.Linear / nn.Conv2d with the layer's dense weight and bias."""
    return layer.to_linear() if isinstance(layer, MPOLinear) else layer.to_conv()


def per_sample_grads(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p, sample):
        return functional_call(module, p, (sample[None],)).square().sum()

    return vmap(grad(loss), in_dims=(None, 0))(params, x)


@pytest.mark.parametrize("which", ["chain", "low-rank", "tucker"])
def test_per_sample_gradients_match_a_loop_over_samples(which):
    layer = tucker_layer() if which == "tucker" else mpo_layer(which == "low-rank")
    x = torch.randn(4, 3, 5, 5, dtype=F64) if which == "tucker" else torch.randn(4, 12, dtype=F64)
    got = per_sample_grads(layer, x)
    for i in range(x.shape[0]):  # plain autograd through the dense reference, one sample at a time
        leaves = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
        if which == "tucker":
            w = tucker_to_dense(leaves["u_out"], leaves["core"], leaves["u_in"])
            out = F.conv2d(x[i : i + 1], w, leaves["bias"], 1, 1)
        else:
            cores = [leaves[f"cores.{k}"] for k in range(len(layer.cores))]
            out = x[i : i + 1] @ mpo_to_dense(cores).t() + leaves["bias"]
        want = torch.autograd.grad(out.square().sum(), list(leaves.values()))
        for name, g_want in zip(leaves, want, strict=True):
            assert_close_rel(got[name][i], g_want, 1e-10, f"{which}: sample {i}, {name}")


@pytest.mark.parametrize("which", ["chain", "low-rank", "tucker"])
def test_jacobian_and_jvp_wrt_input_and_batched_inference(which):
    layer = tucker_layer() if which == "tucker" else mpo_layer(which == "low-rank")
    twin = dense_twin(layer)
    x = torch.randn(2, 3, 4, 4, dtype=F64) if which == "tucker" else torch.randn(3, 12, dtype=F64)
    assert_close_rel(jacrev(layer)(x), jacrev(twin)(x), 1e-10, f"{which}: jacrev")
    v = torch.randn_like(x)
    assert_close_rel(jvp(layer, (x,), (v,))[1], jvp(twin, (x,), (v,))[1], 1e-10, f"{which}: jvp")
    with torch.no_grad():  # one row per vmapped call: the small-row path (native kernels on a CPU) in plain ops
        assert_close_rel(vmap(layer)(x[:, None]), twin(x)[:, None], 1e-10, f"{which}: vmap")


@pytest.mark.parametrize("which", ["chain", "low-rank", "tucker"])
def test_forward_mode_ad_with_dual_tensors(which):
    """torch.autograd.forward_ad (dual tensors, what jacfwd-style tools build on) with tangents on the input and
    on every parameter: the planned Functions have no jvp, so the layers take plain differentiable ops there."""
    import torch.autograd.forward_ad as fwad

    layer = tucker_layer() if which == "tucker" else mpo_layer(which == "low-rank")
    twin = dense_twin(layer)
    x = torch.randn(2, 3, 4, 4, dtype=F64) if which == "tucker" else torch.randn(3, 12, dtype=F64)
    params = dict(layer.named_parameters())
    x_tangent = torch.randn_like(x)
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    with fwad.dual_level():
        dual = {n: fwad.make_dual(p.detach(), tangents[n]) for n, p in params.items()}
        y, y_tangent = fwad.unpack_dual(functional_call(layer, dual, (fwad.make_dual(x, x_tangent),)))
    # the same directional derivative through the dense twin, by reverse mode on a linear function of the tangents
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    xr = x.clone().requires_grad_()
    w = mpo_to_dense([leaves[f"cores.{k}"] for k in range(len(layer.cores))]) if which != "tucker" else None
    if which == "tucker":
        w = tucker_to_dense(leaves["u_out"], leaves["core"], leaves["u_in"])
        out = F.conv2d(xr, w, leaves["bias"], padding=1)
    else:
        out = xr @ w.t() + leaves["bias"]
    assert_close_rel(y, twin(x), 1e-10, f"{which}: forward under dual tensors")
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [xr, *leaves.values()])
    want = (grads[0] * x_tangent).sum() + sum((g * tangents[n]).sum() for n, g in zip(leaves, grads[1:], strict=True))
    assert_close_rel((y_tangent * probe).sum(), want, 1e-10, f"{which}: tangent")
    # the layer called as it stands (its parameters require grad: the training paths) with a dual input
    with fwad.dual_level():
        y_tangent = fwad.unpack_dual(layer(fwad.make_dual(x, x_tangent))).tangent
    assert_close_rel((y_tangent * probe).sum(), (grads[0] * x_tangent).sum(), 1e-10, f"{which}: input tangent")

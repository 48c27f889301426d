"""TuckerConv2d on conv shapes whose kernel unfoldings have fewer ranks than channels, and 'same' padding with an
even kernel.

Before 2026-12-02 from_conv crashed with a bare "size of tensor a (32) must match the size of tensor b (27)" on a
3 -> 32 3x3 stem (EfficientNet, RegNet, VGG) or a 1x1 conv with C_in != C_out, at the default full ranks, with
rel_tol, or with explicit ranks past what the unfoldings have; and a conv with padding='same' and an even kernel
converted fine, then every forward raised. Checked in float64 against F.conv2d / nn.Conv2d.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tnkernels
from tests.helpers import assert_close_rel
from tnkernels.decompose import tucker_decompose, tucker_max_ranks
from tnkernels.nn import TuckerConv2d
from tnkernels.ops import tucker_to_dense

F64 = torch.float64
# (C_out, C_in, k): a stem with C_out > C_in k^2, 1x1 convs narrowing and widening, a 1x1 squeeze of 64 to 4
SHAPES = [(32, 3, 3), (64, 3, 3), (8, 16, 1), (16, 8, 1), (4, 64, 1), (6, 4, 1)]


def check_equals_conv(layer: TuckerConv2d, conv: nn.Conv2d, what: str, tol: float = 1e-10) -> None:
    """Forward and every gradient against autograd through the dense reference F.conv2d, float64."""
    x = torch.randn(2, conv.in_channels, 7, 6, dtype=F64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, want = layer(x), conv(x_ref)
    assert_close_rel(out, want, tol, f"{what}: output")
    grad_out = torch.randn_like(want)
    out.backward(grad_out)
    assert_close_rel(x.grad, torch.autograd.grad(want, x_ref, grad_out)[0], tol, f"{what}: grad x")
    leaves = [t.detach().clone().requires_grad_() for t in (layer.u_out, layer.core, layer.u_in)]
    ref = F.conv2d(x.detach(), tucker_to_dense(*leaves), None, conv.stride, conv.padding, conv.dilation)
    for name, got, g in zip(("u_out", "core", "u_in"), (layer.u_out, layer.core, layer.u_in),
                            torch.autograd.grad(ref, leaves, grad_out), strict=True):  # fmt: skip
        assert_close_rel(got.grad, g, tol, f"{what}: grad {name}")


@pytest.mark.parametrize("shape", SHAPES)
def test_full_ranks_and_rel_tol_are_capped_at_the_attainable_ranks_and_exact(shape):
    c_out, c_in, k = shape
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, dtype=F64)
    attainable = (min(c_out, c_in * k * k), min(c_in, c_out * k * k))
    assert tucker_max_ranks(conv.weight.shape) == attainable
    full = TuckerConv2d.from_conv(conv)  # documented: no ranks / ratio / rel_tol keeps full ranks, exact
    assert full.ranks == attainable
    assert_close_rel(full.to_dense(), conv.weight, 1e-10, f"{shape}: full-rank kernel")
    check_equals_conv(full, conv, f"{shape} full ranks")
    for tol in (0.0, 1e-6, 0.1):
        layer = TuckerConv2d.from_conv(conv, rel_tol=tol)
        assert all(r <= a for r, a in zip(layer.ranks, attainable, strict=True)), (tol, layer.ranks)
        err = (layer.to_dense() - conv.weight).norm() / conv.weight.norm()
        assert err <= max(tol, 1e-10), (tol, layer.ranks, err.item())


@pytest.mark.parametrize(("shape", "ranks"), [((8, 16, 1), (8, 16)), ((32, 3, 3), (32, 3)), ((64, 3, 3), (40, 3)),
                                              ((16, 8, 1), (12, 8)), ((64, 16, 1), (10, 4))])  # fmt: skip
@pytest.mark.parametrize("n_iter", [0, 2])
def test_explicit_ranks_past_the_attainable_ones_are_kept_and_exact(shape, ranks, n_iter):
    """Ranks up to the channel counts (what the constructor accepts) work: the factors are completed with
    orthonormal directions the kernel does not use, so the layer is exact where the ranks cover the attainable ones
    and its extra ranks are there to train. (64, 16, 1) at (10, 4): HOOI's projected unfolding has only 4 columns."""
    c_out, c_in, k = shape
    conv = nn.Conv2d(c_in, c_out, k, dtype=F64)
    layer = TuckerConv2d.from_conv(conv, ranks=ranks, n_iter=n_iter)
    assert layer.ranks == ranks and layer.core.shape == (*ranks, k, k)
    for name, u in (("u_out", layer.u_out), ("u_in", layer.u_in)):
        assert_close_rel(u.t() @ u, torch.eye(u.shape[1], dtype=F64), 1e-12, f"{name} orthonormal")
    if all(r >= a for r, a in zip(ranks, tucker_max_ranks(conv.weight.shape), strict=True)):
        check_equals_conv(layer, conv, f"{shape} ranks {ranks}")
    else:  # truncated in one mode: the best the HOSVD gives at these ranks, no worse than at capped ranks
        capped = tuple(min(r, a) for r, a in zip(ranks, tucker_max_ranks(conv.weight.shape), strict=True))
        (_, err_capped) = tucker_decompose(conv.weight, capped, n_iter=n_iter, return_error=True)
        err = ((layer.to_dense() - conv.weight).norm() / conv.weight.norm()).item()
        assert err <= err_capped + 1e-10


def test_tensorize_converts_stems_at_full_ranks_and_with_rel_tol():
    for kwargs in ({}, {"rel_tol": 1e-3}):
        model = nn.Sequential(nn.Conv2d(3, 32, 3, dtype=F64), nn.ReLU(), nn.Conv2d(32, 8, 1, dtype=F64))
        dense = copy.deepcopy(model)
        report = tnkernels.tensorize(model, **kwargs)
        assert isinstance(model[0], TuckerConv2d) and isinstance(model[2], TuckerConv2d), str(report)
        assert model[0].ranks == (27, 3) and model[2].ranks[0] <= 8
        x = torch.randn(2, 3, 8, 8, dtype=F64)
        assert_close_rel(model(x), dense(x), 1e-10 if not kwargs else 3e-3, f"tensorize {kwargs}")


# ------------------------------------------------------------------------------------ 'same' with an even kernel
@pytest.mark.parametrize(("kernel", "dilation"), [(4, 1), ((2, 3), 1), (2, (3, 2)), (3, 1), (4, 2)])
@pytest.mark.parametrize("ranks", [None, (3, 2)])
def test_same_padding_with_an_even_kernel_matches_nn_conv2d(kernel, dilation, ranks):
    """nn.Conv2d pads the odd pixel of 'same' on the right/bottom; the layer pads its input so (F.pad, zeros) and
    convolves without padding, forward and gradients as nn.Conv2d's; odd effective kernels keep the convolution's
    own padding."""
    conv = nn.Conv2d(4, 6, kernel, padding="same", dilation=dilation, dtype=F64)
    layer = TuckerConv2d.from_conv(conv, ranks=ranks)
    effective = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
    assert (layer._pad is not None) == any(e % 2 for e in effective)
    if ranks is None:
        check_equals_conv(layer, conv, f"kernel {kernel}, dilation {dilation}")
    else:  # the dense reference of the layer's own (truncated) kernel
        ref = nn.Conv2d(4, 6, kernel, padding="same", dilation=dilation, bias=False, dtype=F64)
        with torch.no_grad():
            ref.weight.copy_(layer.to_dense())
        ref.bias = layer.bias
        check_equals_conv(layer, ref, f"kernel {kernel}, dilation {dilation}, ranks {ranks}")
    x = torch.randn(4, 9, 8, dtype=F64)  # unbatched, and the layer's to_conv, too
    assert_close_rel(layer(x), layer.to_conv()(x), 1e-10, "unbatched")
    with torch.no_grad():
        assert_close_rel(layer(x[None]), layer.to_conv()(x[None]), 1e-10, "no-grad")
    assert layer.explain((1, 4, 9, 8)).strip()


def test_same_even_kernel_in_a_tensorized_model_and_after_a_copy():
    model = nn.Sequential(nn.Conv2d(4, 32, 2, padding="same", dtype=F64), nn.ReLU())
    dense = copy.deepcopy(model)
    tnkernels.tensorize(model)
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    assert_close_rel(model(x), dense(x), 1e-10, "tensorized")
    layer = model[0]
    state = layer.__getstate__()
    state["_pad"] = None  # what a layer pickled before 'same' padded its input (the forward then raised) holds
    old = TuckerConv2d.__new__(TuckerConv2d)
    old.__setstate__(state)
    assert_close_rel(old(x), dense[0](x), 1e-10, "a layer pickled before the fix")


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"kernel_size": (3, 3, 3)}, "kernel_size"),
        ({"stride": 1.5}, "stride"),
        ({"padding": (1, 1.5)}, "padding"),
        ({"dilation": True}, "dilation"),
    ],
)
def test_conv_geometry_that_nn_conv2d_would_not_take_is_refused_by_name(kwargs, bad):
    """A 3-entry kernel size used to be cut to its first two entries and a float stride truncated: a different
    convolution from the one asked for, with no error. The layer and the functional op name the argument."""
    layer_kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=f"TuckerConv2d: {bad} must be an int or a pair of ints"):
        TuckerConv2d(4, 4, ranks=(2, 2), **layer_kwargs)
    if bad != "kernel_size":
        layer = TuckerConv2d(4, 4, 3, ranks=(2, 2))
        with pytest.raises(ValueError, match=f"tucker_conv2d: {bad} must be an int or a pair of ints"):
            tnkernels.tucker_conv2d(torch.randn(1, 4, 6, 6), layer.u_in, layer.core, layer.u_out, **kwargs)


def test_numpy_integers_are_taken_as_ints():
    import numpy as np

    layer = TuckerConv2d(4, 4, np.int64(3), ranks=(2, 2), stride=(np.int64(2), 1), padding=np.int32(1))
    assert (layer.kernel_size, layer.stride, layer.padding) == ((3, 3), (2, 1), (1, 1))
    assert all(type(v) is int for v in (*layer.kernel_size, *layer.stride, *layer.padding))

"""The layers under torch.nn.utils (parametrize, prune, weight_norm) and under code that reads `.weight`.

parametrize and prune move a parameter out of the module's `_parameters`, where the layers' fast forward reads it;
the forward must then see the parametrized / masked value, not drop it (a bias) or use the unmasked original.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from tests.helpers import assert_close_rel, tolerance
from tnkernels import MPOLinear, TuckerConv2d
from tnkernels.ops.mpo.reference import mpo_linear_reference
from tnkernels.ops.tucker.reference import tucker_conv2d_reference

F64 = torch.float64


class Doubled(nn.Module):
    def forward(self, t):
        return 2 * t


def _mpo(bias=True):
    torch.manual_seed(0)
    return MPOLinear(12, 10, in_modes=(3, 4), out_modes=(2, 5), bonds=(3,), bias=bias, dtype=F64)


def _tucker(bias=True):
    torch.manual_seed(0)
    return TuckerConv2d(4, 6, 3, ranks=(3, 2), padding=1, bias=bias, dtype=F64)


def _mpo_ref(layer, x, cores=None, bias=None):
    cores = [c.detach() for c in layer.cores] if cores is None else cores
    return mpo_linear_reference(x, cores, bias)


def _tucker_ref(layer, x, u_in, core, u_out, bias):
    return tucker_conv2d_reference(x, u_in, core, u_out, bias, (1, 1), (1, 1), (1, 1))


@pytest.mark.parametrize("which", ["bias", "core"])
def test_mpo_parametrized_parameter_is_used_and_trained(which):
    layer = _mpo()
    x = torch.randn(5, 12, dtype=F64)
    cores = [c.detach().clone() for c in layer.cores]
    bias = layer.bias.detach().clone()
    if which == "bias":
        parametrize.register_parametrization(layer, "bias", Doubled())
        expected = _mpo_ref(layer, x, cores, 2 * bias)
        original = layer.parametrizations.bias.original
    else:
        parametrize.register_parametrization(layer.cores, "1", Doubled())
        expected = _mpo_ref(layer, x, [cores[0], 2 * cores[1]], bias)
        original = layer.cores.parametrizations["1"].original
    y = layer(x)
    assert_close_rel(y, expected, tolerance(F64), f"MPOLinear with a parametrized {which}")
    y.sum().backward()
    assert original.grad is not None and original.grad.abs().sum() > 0


def test_mpo_pruned_core_is_masked_and_follows_updates_of_the_original():
    layer = _mpo()
    x = torch.randn(5, 12, dtype=F64)
    prune.l1_unstructured(layer.cores, "1", amount=0.9)
    masked = layer.cores.get_parameter("1_orig").detach() * layer.cores.get_buffer("1_mask")
    assert_close_rel(
        layer(x), _mpo_ref(layer, x, [layer.cores[0].detach(), masked], layer.bias), tolerance(F64), "pruned"
    )
    with torch.no_grad():  # an optimizer step on the original
        layer.cores.get_parameter("1_orig").add_(1.0)
    masked = layer.cores.get_parameter("1_orig").detach() * layer.cores.get_buffer("1_mask")
    expected = _mpo_ref(layer, x, [layer.cores[0].detach(), masked], layer.bias)
    assert_close_rel(layer(x), expected, tolerance(F64), "pruned, after an update of the original")


def test_mpo_weight_norm_on_a_core_runs_as_its_formula():
    layer = _mpo(bias=False)
    x = torch.randn(5, 12, dtype=F64)
    expected = _mpo_ref(layer, x)  # weight_norm starts as an exact reparametrization
    nn.utils.parametrizations.weight_norm(layer.cores, "0")
    assert_close_rel(layer(x), expected, tolerance(F64), "weight_norm on core 0")


@pytest.mark.parametrize("which", ["bias", "core", "u_in"])
def test_tucker_parametrized_or_pruned_parameter_is_used(which):
    layer = _tucker()
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    u_in, core, u_out, bias = (p.detach().clone() for p in (layer.u_in, layer.core, layer.u_out, layer.bias))
    if which == "bias":
        parametrize.register_parametrization(layer, "bias", Doubled())
        expected = _tucker_ref(layer, x, u_in, core, u_out, 2 * bias)
    elif which == "core":
        parametrize.register_parametrization(layer, "core", Doubled())
        expected = _tucker_ref(layer, x, u_in, 2 * core, u_out, bias)
    else:
        prune.l1_unstructured(layer, "u_in", amount=0.5)
        expected = _tucker_ref(layer, x, u_in * layer.get_buffer("u_in_mask"), core, u_out, bias)
    y = layer(x)
    assert_close_rel(y, expected, tolerance(F64), f"TuckerConv2d with a parametrized / pruned {which}")
    y.sum().backward()


def test_reading_weight_says_why_and_how_to_fix():
    for layer, method in ((_mpo(), "to_linear"), (_tucker(), "to_conv")):
        assert not hasattr(layer, "weight")
        with pytest.raises(AttributeError, match=rf"{type(layer).__name__} has no dense \.weight.*rules=.*{method}"):
            layer.weight  # noqa: B018
        with pytest.raises(AttributeError, match="has no attribute 'nothing'"):  # other names: torch's error
            layer.nothing  # noqa: B018


def test_code_that_reads_the_weight_meets_the_explanation():
    attention = nn.MultiheadAttention(12, 2, batch_first=True, dtype=F64)
    attention.out_proj = MPOLinear(12, 12, in_modes=(3, 4), out_modes=(3, 4), bonds=(2,), dtype=F64)
    x = torch.randn(1, 3, 12, dtype=F64)
    with pytest.raises(AttributeError, match="MPOLinear has no dense .weight"):
        attention(x, x, x)
    with pytest.raises(AttributeError, match="TuckerConv2d has no dense .weight"):
        F.conv2d(torch.randn(1, 4, 5, 5, dtype=F64), _tucker().weight)


@pytest.mark.parametrize("undo", ["prune.remove", "remove_parametrizations"])
def test_making_a_pruned_or_parametrized_core_permanent_keeps_the_core_order(undo):
    """prune.remove and remove_parametrizations put the core back at the end of the list's dict: a forward that
    read the dict in order got the cores swapped (found 2026-12-02)."""
    torch.manual_seed(0)
    layer = MPOLinear(24, 20, in_modes=(2, 3, 4), out_modes=(5, 2, 2), bonds=(3, 4), dtype=F64)
    x = torch.randn(5, 24, dtype=F64)
    if undo == "prune.remove":
        prune.l1_unstructured(layer.cores, "0", amount=0.5)
        prune.remove(layer.cores, "0")
    else:
        parametrize.register_parametrization(layer.cores, "1", Doubled())
        parametrize.remove_parametrizations(layer.cores, "1")
    assert list(layer.cores._parameters) != ["0", "1", "2"]  # the case this test is about
    expected = _mpo_ref(layer, x, bias=layer.bias.detach())
    assert_close_rel(layer(x), expected, tolerance(F64), f"after {undo}")

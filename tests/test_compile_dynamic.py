"""torch.compile(dynamic=True) of TuckerConv2d and of the functional tucker_conv2d.

With dynamic=True every input size is symbolic, the channel count too, and the plan lookups are constants to
dynamo (assume_constant_result) that take plain ints only: before 2026-12-02 the first call failed with
"assume_constant_result argument conversion failed" (fullgraph=True), or broke the graph there. The plan is made
for the batch's and the spatial sizes' buckets (plan/cache.py planned_size), the channels come from u_in, and the
functional op's symbolic factor sizes are specialized (ops/tucker/torch_impl.py _plan_shapes).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_close_rel, tolerance
from tnkernels.nn import TuckerConv2d
from tnkernels.ops import tucker_conv2d, tucker_to_dense
from tnkernels.plan import options

SIZES = [(2, 5), (5, 5), (2, 9), (5, 9)]  # (batch, spatial side): two of each


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_tucker_conv_compiled_with_dynamic_shapes_and_fullgraph(backend):
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = TuckerConv2d.from_conv(conv, ranks=(4, 2))
    dense = layer.to_conv()  # nn.Conv2d with the layer's kernel
    dynamo.reset()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend=backend)
    tol = tolerance(torch.float32)
    for batch, side in SIZES:
        x = torch.randn(batch, 3, side, side + 1, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, want = compiled(x), dense(x_ref)
        assert_close_rel(y, want, tol, f"{backend}: batch {batch}, side {side}")
        if backend == "aot_eager":  # and the gradients (inductor's backward compile is slow on this CI)
            grad_out = torch.randn_like(want)
            y.backward(grad_out)
            assert_close_rel(x.grad, torch.autograd.grad(want, x_ref, grad_out)[0], tol, "grad x")
            assert layer.core.grad is not None and layer.u_in.grad is not None
            layer.zero_grad()


@pytest.mark.parametrize("kind", ["three-convs", "fold-in", "fold-out", "dense"])
def test_every_plan_kind_compiles_with_dynamic_shapes(kind):
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    layer = TuckerConv2d.from_conv(conv)  # full ranks: exactly the conv
    dynamo.reset()
    with options(tucker_force=kind):
        compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend="aot_eager")
        for batch, side in SIZES[::3]:
            x = torch.randn(batch, 4, side, side, dtype=torch.float64)
            assert_close_rel(compiled(x), conv(x), 1e-10, f"{kind}: batch {batch}, side {side}")


def test_the_functional_op_compiles_with_dynamic_factor_shapes():
    """Compiled as a function of all its tensors, the factors' sizes are symbolic too: specialized for the plan
    (another rank recompiles), the input's bucketed."""

    def f(x, u_in, core, u_out):
        return tucker_conv2d(x, u_in, core, u_out, None, padding=1, backend="torch")

    dynamo.reset()
    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for c_in, r_in, batch in ((3, 2, 2), (5, 3, 4), (5, 3, 7)):
        x = torch.randn(batch, c_in, 6, 7, dtype=torch.float64)
        u_in, core, u_out = (torch.randn(*s, dtype=torch.float64) for s in ((c_in, r_in), (4, r_in, 3, 3), (7, 4)))
        want = F.conv2d(x, tucker_to_dense(u_out, core, u_in), None, 1, 1)
        assert_close_rel(compiled(x, u_in, core, u_out), want, 1e-10, f"c_in {c_in}, r_in {r_in}, batch {batch}")

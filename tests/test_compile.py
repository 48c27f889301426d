"""torch.compile traces MPOLinear and TuckerConv2d without graph breaks, for the torch and the triton backend.

The triton backend reaches torch.compile as the torch.library custom ops tnkernels::mpo_linear_triton and
tnkernels::tucker_conv2d_triton (opaque nodes with fake implementations and registered autograd), so dynamo never
has to trace into a Triton launch. On this CPU machine the triton case runs under TRITON_INTERPRET=1. A model
compiled before any eager call also traces with fullgraph=True at new batch sizes: the plan decisions are
constants to dynamo (tnkernels/plan/cache.py).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

from tests.helpers import assert_close_rel, tolerance
from tnkernels.nn import MPOLinear, TuckerConv2d
from tnkernels.ops import backend_available
from tnkernels.ops.tucker import tuned
from tnkernels.plan import clear_plans


class TinyNet(nn.Module):
    """conv -> Tucker conv -> flatten -> MPO linear: both tensorized layer kinds in one graph."""

    def __init__(self, backend: str, low_rank: bool = False):
        super().__init__()
        conv = nn.Conv2d(4, 6, 3, padding=1)
        lin = nn.Linear(6 * 2 * 2, 10)
        self.tconv = TuckerConv2d.from_conv(conv, ranks=(3, 2), backend=backend)
        self.pool = nn.AdaptiveAvgPool2d(2)
        # low rank: modes (in, 1) x (1, out), which the torch backend runs as two GEMMs (torch_low_rank)
        modes = ((24, 1), (1, 10)) if low_rank else ((4, 6), (2, 5))
        self.mpo = MPOLinear.from_linear(lin, in_modes=modes[0], out_modes=modes[1], max_bond=3, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.tconv(x))
        return self.mpo(self.pool(h).flatten(1))


@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_graph_breaks(backend, low_rank):
    ok, why = backend_available("mpo_linear", backend)
    if not ok:
        pytest.skip(why)
    net = TinyNet(backend, low_rank)
    x = torch.randn(2, 4, 5, 5)
    eager = net(x)  # first call imports the backend modules (outside the traced region)
    dynamo.reset()
    explanation = dynamo.explain(net)(x)
    reasons = [str(b.reason)[:300] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1

    # The compiled module (eager backend: dynamo + AOT autograd, no codegen) gives the same output and gradients.
    dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert_close_rel(y, eager, tolerance(torch.float32, backend), f"compiled {backend}")
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    net(x).square().sum().backward()
    for n, p in net.named_parameters():
        assert_close_rel(grads[n], p.grad, tolerance(torch.float32, backend), f"compiled {backend}: grad {n}")


@pytest.mark.parametrize("inference", ["no_grad", "inference_mode"])
def test_compiled_inference_at_a_few_rows_has_no_graph_breaks(inference):
    """Few rows under no_grad is where backend="auto" picks the native C++ kernel on a CPU; dynamo cannot trace
    that call (it failed on `tensor.is_inference()` in its wrapper, found 2026-12-02), so compiled calls take the
    torch backend."""
    net = TinyNet("auto")
    x = torch.randn(2, 4, 5, 5)
    context = torch.no_grad if inference == "no_grad" else torch.inference_mode
    with context():
        eager = net(x)
        dynamo.reset()
        explanation = dynamo.explain(net)(x)
        assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
        dynamo.reset()
        y = torch.compile(net, backend="aot_eager", fullgraph=True)(x)
    assert_close_rel(y, eager, tolerance(torch.float32, "torch"), f"compiled under {inference}")


@pytest.mark.parametrize(("backend", "low_rank"), [("torch", False), ("torch", True), ("triton", False)])
def test_first_call_compiled_with_fullgraph_at_new_batch_sizes(backend, low_rank, monkeypatch, tmp_path):
    """torch.compile(model, fullgraph=True) before any eager call, then batch sizes dynamo has not seen: the plan
    searches, the Tucker kind timing and the backend loading run at trace time (they are constants to dynamo), and
    a new batch size recompiles (a plan per bucket of batch sizes) instead of breaking the graph."""
    ok, why = backend_available("mpo_linear", backend)
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("TNK_TUCKER_TUNE", "1")  # the kind is timed on first use: here, while dynamo traces
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuned, "_MEMO", {})
    clear_plans()
    net = TinyNet(backend, low_rank)
    eager = copy.deepcopy(net)
    dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    tol = tolerance(torch.float32, backend)
    for batch in (2, 3, 5):
        x = torch.randn(batch, 4, 5, 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = compiled(x)
        # dynamo warns about what it meets while tracing our code (it once met a functools-cached function)
        ours = [str(w.message)[:300] for w in caught if "tnkernels" in str(w.message) + w.filename]
        assert not ours, ours
        y_eager = eager(x)
        assert_close_rel(y, y_eager, tol, f"batch {batch}")
        y.square().sum().backward()
        y_eager.square().sum().backward()
        for (name, p), q in zip(net.named_parameters(), eager.parameters(), strict=True):
            assert_close_rel(p.grad, q.grad, tol, f"batch {batch}: grad {name}")
        net.zero_grad()
        eager.zero_grad()
    if backend == "torch":  # the kinds timed during tracing were stored like eager ones
        assert (tmp_path / "tucker_kinds-v2.json").exists()


def test_export_with_a_dynamic_batch_and_compile_over_many_batch_sizes():
    """torch.export with a dynamic batch dimension (the plans are made at a representative size, with no guard on
    the dimension), and torch.compile over ten batch sizes: one graph per power-of-4 bucket of sizes (seven
    here), not one per size, each equal to eager, forward and backward."""
    from torch._dynamo.utils import counters
    from torch.export import Dim, export

    net = TinyNet("torch")
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            program = export(net, (torch.randn(5, 4, 5, 5),), dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}})
            x = torch.randn(300, 4, 5, 5)
            assert_close_rel(program.module()(x), net(x), tolerance(torch.float32, "torch"), f"export, grad={grad}")
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    for batch in (1, 2, 3, 5, 9, 17, 40, 100, 700, 3000):
        x = torch.randn(batch, 4, 5, 5)
        y = compiled(x)
        assert_close_rel(y, net(x), tolerance(torch.float32, "torch"), f"batch {batch}")
        y.sum().backward()
    assert counters["stats"]["unique_graphs"] <= 7  # buckets 1, 4, 16, 64, 256, 1024, 4096 (measured: 7)


@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_an_exported_model_trains_like_the_eager_one(low_rank, grad):
    """An exported program records the ops that ran: a detached operand was recorded as aten.detach and cut every
    gradient through the layer, the input's included (found 2026-12-02). Exported under no_grad or not, the
    program's module must give every parameter and the input the eager gradients."""
    from torch.export import export

    net = TinyNet("torch", low_rank=low_rank)
    with torch.set_grad_enabled(grad):
        program = export(net, (torch.randn(3, 4, 5, 5),))
    exported = program.module()
    x = torch.randn(3, 4, 5, 5)
    grads = {}
    for name, model in (("eager", net), ("exported", exported)):
        xg = x.clone().requires_grad_()
        model(xg).square().sum().backward()
        grads[name] = {"x": xg.grad, **{n: p.grad for n, p in model.named_parameters()}}
    assert grads["exported"].keys() == grads["eager"].keys()
    for n, g in grads["eager"].items():
        assert grads["exported"][n] is not None, f"no gradient for {n} through the exported program"
        assert_close_rel(grads["exported"][n], g, tolerance(torch.float32, "torch"), f"gradient of {n}")


def test_torchscript_is_refused_with_a_pointer_to_export():
    """jit.trace used to fail deep inside a first-call timing or to record it, depending on the caches;
    jit.script failed to compile the planner's Python. Both now say what to use instead."""
    mpo = MPOLinear.from_linear(torch.nn.Linear(16, 24), ratio=2).eval()
    conv = TuckerConv2d.from_conv(torch.nn.Conv2d(4, 6, 3), ratio=1.5).eval()
    with torch.no_grad():
        mpo(torch.randn(3, 16))  # a planned, remembered call first: the memo must not let the trace through
        for layer, x in ((mpo, torch.randn(3, 16)), (conv, torch.randn(1, 4, 6, 6))):
            with pytest.raises(RuntimeError, match="torch.jit.trace is not supported; export the model"):
                torch.jit.trace(layer, x)
            with pytest.raises(RuntimeError, match=f"{type(layer).__name__}: torch.jit.script is not supported"):
                torch.jit.script(torch.nn.Sequential(layer))
            with pytest.raises(RuntimeError, match=r"for ONNX, torch.onnx.export\(model, \(x,\), dynamo=True\)"):
                torch.onnx.export(layer, (x,), io.BytesIO(), dynamo=False)  # the TorchScript exporter traces

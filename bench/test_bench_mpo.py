"""pytest-benchmark suite: MPO / Tucker layers against dense and the peers, and the cached plan lookup.

    pytest bench/test_bench_mpo.py --benchmark-enable
    pytest bench/test_bench_mpo.py --benchmark-enable -k lookup       # the < 5 us plan lookup

Every test sets its benchmark group (the case and pass: "minilm-mlp-up-r64-x4 forward"), so pytest-benchmark's
default grouping shows the providers of one case side by side. (`--benchmark-group-by=param:case` fails with a
KeyError on the tests that have no `case` parameter.)

Each case builds every provider with the same modes and bonds (bench/providers.py). The whole grid with its
table, JSON and roofline column is `python -m bench.run_grid` (this file is the pytest-benchmark view of a few
representative points, for comparing runs with --benchmark-compare; docs/planner.md, "Tracking regressions").

Every test calls its function once before handing it to `benchmark`: a layer's first call plans, measures the thin
kernels or Tucker kinds on this machine and fills the call memo (milliseconds against microseconds), and
pytest-benchmark, which does not warm up on CPython by default, would time it and size the rounds by it.
"""

from __future__ import annotations

import pytest
import torch

from bench.providers import conv_providers, linear_providers
from bench.run_grid import LINEAR_SHAPES
from tnkernels.ops.tucker.ranks import choose_tucker_ranks
from tnkernels.plan import choose_mpo_structure, mpo_decision, options

CASES = [  # (layer, rows, ratio)
    ("minilm-mlp-up", 64, 4),
    ("minilm-mlp-down", 1024, 16),
    ("gpt2-mlp-up", 64, 16),
    ("resnet34-fc", 1, 4),
]
PROVIDERS = ["dense", "tnkernels", "naive-einsum", "tltorch", "torch-mpo"]


def _provider(layer: str, ratio: float, name: str):
    n_in, n_out = LINEAR_SHAPES[layer]
    s = choose_mpo_structure(n_out, n_in, ratio, rows=1024)
    found = {p.name: p for p in linear_providers(s.in_modes, s.out_modes, s.bonds)}[name]
    if found.module is None:
        pytest.skip(found.why)
    return found.module, n_in


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", [f"{a}-r{b}-x{c}" for a, b, c in CASES])
def test_linear_forward(benchmark, case, provider):
    layer, rows, ratio = next((a, b, c) for a, b, c in CASES if f"{a}-r{b}-x{c}" == case)
    module, n_in = _provider(layer, ratio, provider)
    benchmark.group = f"{case} forward"
    x = torch.randn(rows, n_in)
    with torch.no_grad():
        module(x)  # warm-up (see the module docstring)
        benchmark(module, x)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", [f"{a}-r{b}-x{c}" for a, b, c in CASES])
def test_linear_forward_backward(benchmark, case, provider):
    layer, rows, ratio = next((a, b, c) for a, b, c in CASES if f"{a}-r{b}-x{c}" == case)
    module, n_in = _provider(layer, ratio, provider)
    benchmark.group = f"{case} forward+backward"
    x = torch.randn(rows, n_in, requires_grad=True)
    params = list(module.parameters())
    with torch.no_grad():
        gy = torch.randn_like(module(x))  # a dense upstream gradient, as in run_grid (not .sum().backward())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(gy)

    step()  # warm-up
    benchmark(step)


@pytest.mark.parametrize("recompute", [False, True])
def test_linear_recompute_time(benchmark, recompute):
    """The time side of the recompute option (its memory side is in run_grid's recompute_saved_bytes)."""
    module, n_in = _provider("minilm-mlp-down", 16, "tnkernels")
    benchmark.group = "recompute: minilm-mlp-down-r1024-x16 forward+backward"
    x = torch.randn(1024, n_in, requires_grad=True)
    params = list(module.parameters())
    with torch.no_grad():
        gy = torch.randn_like(module(x))

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        with options(recompute=recompute):
            module(x).backward(gy)

    step()  # warm-up
    benchmark(step)


@pytest.mark.parametrize("provider", ["dense", "tnkernels", "tltorch"])
@pytest.mark.parametrize("channels,hw", [(64, 56), (256, 14)], ids=["conv64-56x56", "conv256-14x14"])
def test_conv_forward(benchmark, provider, channels, hw):
    ranks = choose_tucker_ranks(torch.randn(channels, channels, 3, 3), 4, ((1, 1), (1, 1), (1, 1)))
    found = {p.name: p for p in conv_providers(channels, channels, 3, ranks, 1)}[provider]
    if found.module is None:
        pytest.skip(found.why)
    benchmark.group = f"conv{channels}-{hw}x{hw} batch 8 forward"
    x = torch.randn(8, channels, hw, hw)
    with torch.no_grad():
        found.module(x)  # warm-up
        benchmark(found.module, x)


def test_cached_plan_lookup(benchmark):
    """A forward pays one cached lookup; the issue's bar is under 5 microseconds."""
    shapes = ((1, 40, 80, 16), (16, 40, 80, 1))
    dev = torch.device("cpu")
    mpo_decision(shapes, 64, torch.float32, dev, False)
    benchmark.group = "plan lookup"
    benchmark(mpo_decision, shapes, 64, torch.float32, dev, False)

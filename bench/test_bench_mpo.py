"""pytest-benchmark suite: MPO / Tucker layers against dense and the peers, and the cached plan lookup.

    pytest bench/test_bench_mpo.py --benchmark-enable --benchmark-group-by=param:case
    pytest bench/test_bench_mpo.py --benchmark-enable -k lookup       # the < 5 us plan lookup

Each case builds every provider with the same modes and bonds (bench/providers.py). The whole grid with its
table, JSON and roofline column is `python -m bench.run_grid` (this file is the pytest-benchmark view of a few
representative points, for comparing runs with --benchmark-compare).
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
    x = torch.randn(rows, n_in)
    with torch.no_grad():
        benchmark(module, x)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", [f"{a}-r{b}-x{c}" for a, b, c in CASES])
def test_linear_forward_backward(benchmark, case, provider):
    layer, rows, ratio = next((a, b, c) for a, b, c in CASES if f"{a}-r{b}-x{c}" == case)
    module, n_in = _provider(layer, ratio, provider)
    x = torch.randn(rows, n_in, requires_grad=True)
    params = list(module.parameters())
    with torch.no_grad():
        gy = torch.randn_like(module(x))  # a dense upstream gradient, as in run_grid (not .sum().backward())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(gy)

    benchmark(step)


@pytest.mark.parametrize("recompute", [False, True])
def test_linear_recompute_time(benchmark, recompute):
    """The time side of the recompute option (its memory side is in run_grid's recompute_saved_bytes)."""
    module, n_in = _provider("minilm-mlp-down", 16, "tnkernels")
    x = torch.randn(1024, n_in, requires_grad=True)
    with torch.no_grad():
        gy = torch.randn_like(module(x))

    def step():
        with options(recompute=recompute):
            module(x).backward(gy)

    benchmark(step)


@pytest.mark.parametrize("provider", ["dense", "tnkernels", "tltorch"])
@pytest.mark.parametrize("channels,hw", [(64, 56), (256, 14)])
def test_conv_forward(benchmark, provider, channels, hw):
    ranks = choose_tucker_ranks(torch.randn(channels, channels, 3, 3), 4, ((1, 1), (1, 1), (1, 1)))
    found = {p.name: p for p in conv_providers(channels, channels, 3, ranks, 1)}[provider]
    if found.module is None:
        pytest.skip(found.why)
    x = torch.randn(8, channels, hw, hw)
    with torch.no_grad():
        benchmark(found.module, x)


def test_cached_plan_lookup(benchmark):
    """A forward pays one cached lookup; the issue's bar is under 5 microseconds."""
    shapes = ((1, 40, 80, 16), (16, 40, 80, 1))
    dev = torch.device("cpu")
    mpo_decision(shapes, 64, torch.float32, dev, False)
    benchmark(mpo_decision, shapes, 64, torch.float32, dev, False)

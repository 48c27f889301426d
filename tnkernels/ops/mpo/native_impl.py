"""Native (C++) CPU backend for the MPO chain: small-batch inference in one call.

The compiled kernel lives in csrc/mpo_chain.cpp and is built by setup.py as `tnkernels._native` (optional: the
package works without it). It sweeps the cores left to right, one small GEMM per core, with every intermediate of a
chunk of rows kept in cache and fp32 accumulation; cores may be float32 or bfloat16. Forward only: training goes
through backend="torch".

Before the sweep, adjacent cores may be merged (with torch matmuls) when that lowers the total work: a plain sweep
multiplies each core by prod(j_<k) * prod(i_>k) rows, which for large middle bonds costs far more than merging the
small boundary cores into their neighbours first. `choose_groups` picks the grouping from a FLOP count and caches
it per (core shapes, rows); `native_cost` returns that count for the planner.

Each step then runs either on the fused micro-kernel or through ATen's GEMM (MKL) called from C++ (both without
Python dispatch). Which is faster depends on the CPU and the shapes, so for calls above `_TUNE_MIN_FLOPS` the first
call with a new key (shapes, rows, dtypes, threads) times both routes on the real inputs and remembers the winner
(`route_cache()` shows the choices). The two routes agree to fp32 rounding.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Sequence

import torch

try:  # the extension is optional: a missing or broken build only disables this backend
    from tnkernels import _native as _ext

    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    _ext = None
    _IMPORT_ERROR = str(exc)

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
_INPUT_DTYPES = (torch.float32, torch.bfloat16)


def is_available() -> tuple[bool, str]:
    """(True, "") when the compiled extension is importable, else (False, why)."""
    if _ext is None:
        return False, (
            f"the tnkernels._native extension is not built ({_IMPORT_ERROR}); reinstall with "
            "`pip install --no-build-isolation -e .` without TNK_NO_NATIVE=1, with a C++ compiler present"
        )
    return True, ""


def native_available() -> bool:
    """Whether the csrc/ extension was built and imports."""
    return _ext is not None


def sweep_flops(cores: Sequence[torch.Tensor], rows: int) -> int:
    """FLOPs of the left-to-right sweep the kernel runs: sum_k 2 * rows * |G_k| * prod(j_<k) * prod(i_>k)."""
    in_modes = [int(g.shape[1]) for g in cores]
    out_modes = [int(g.shape[2]) for g in cores]
    total = 0
    for k, g in enumerate(cores):
        j_before = 1
        for j in out_modes[:k]:
            j_before *= j
        i_after = 1
        for i in in_modes[k + 1 :]:
            i_after *= i
        total += 2 * rows * g.numel() * j_before * i_after
    return total


# FLOP-equivalent of one extra torch op (dispatch + allocation, ~10 us at ~20 GFLOP/s): keeps tiny merges from
# being chosen for a negligible FLOP saving.
_OP_OVERHEAD_FLOPS = 2e5


def _sweep_flops_shapes(shapes: Sequence[tuple[int, int, int, int]], rows: int) -> int:
    total = 0
    for k, (r0, i, j, r1) in enumerate(shapes):
        j_before = 1
        for s in shapes[:k]:
            j_before *= s[2]
        i_after = 1
        for s in shapes[k + 1 :]:
            i_after *= s[1]
        total += 2 * rows * r0 * i * j * r1 * j_before * i_after
    return total


def _merge_cost(shapes: Sequence[tuple[int, int, int, int]]) -> tuple[float, tuple[int, int, int, int]]:
    """FLOP-equivalent cost of merging `shapes` left to right (matmul + permute copy per step), and the result."""
    r0, big_i, big_j, r = shapes[0]
    cost = 0.0
    for _, i, j, r1 in shapes[1:]:
        cost += (
            2.0 * r0 * big_i * big_j * r * i * j * r1 + 4.0 * r0 * big_i * i * big_j * j * r1 + 2 * _OP_OVERHEAD_FLOPS
        )
        big_i, big_j, r = big_i * i, big_j * j, r1
    return cost, (r0, big_i, big_j, r)


@functools.lru_cache(maxsize=1024)
def choose_groups(
    shapes: tuple[tuple[int, int, int, int], ...], rows: int
) -> tuple[tuple[tuple[int, int], ...], float]:
    """The contiguous grouping of cores (half-open ranges) that minimises merge + sweep work, and that work in
    FLOP-equivalents. All 2^(N-1) groupings are tried (N <= ~8 cores in practice)."""
    n = len(shapes)
    best: tuple[tuple[tuple[int, int], ...], float] | None = None
    for cuts in itertools.product((False, True), repeat=n - 1):
        groups, start = [], 0
        for k, cut in enumerate(cuts, start=1):
            if cut:
                groups.append((start, k))
                start = k
        groups.append((start, n))
        cost, merged = 0.0, []
        for a, b in groups:
            if b - a == 1:
                merged.append(shapes[a])
            else:
                c, m = _merge_cost(shapes[a:b])
                cost += c
                merged.append(m)
        cost += _sweep_flops_shapes(merged, rows)
        if best is None or cost < best[1]:
            best = (tuple(groups), cost)
    assert best is not None
    return best


def native_cost(cores: Sequence[torch.Tensor], rows: int) -> float:
    """FLOP-equivalent work of one native call with `rows` rows (merges included), for the planner to compare."""
    return choose_groups(tuple(tuple(int(d) for d in g.shape) for g in cores), int(rows))[1]


# gemm routes of the compiled entry
_KERNEL, _ATEN = 1, 2
# Below this much work the fused kernel always wins (ATen adds a gather copy and a call per step): no tuning.
_TUNE_MIN_FLOPS = 2e6
_TUNE_REPS = 3
_ROUTES: dict[tuple, int] = {}


def route_cache() -> dict[tuple, str]:
    """The routes chosen so far: {(core shapes, rows, x dtype, core dtype, threads): "kernel" | "aten"}."""
    return {k: ("kernel" if v == _KERNEL else "aten") for k, v in _ROUTES.items()}


def _pick_route(key: tuple, run) -> int:
    """Time both routes on the real call (interleaved, best of _TUNE_REPS) and remember the faster one."""
    best = {_KERNEL: float("inf"), _ATEN: float("inf")}
    for _ in range(_TUNE_REPS):
        for route in best:
            t0 = time.perf_counter()
            run(route)
            best[route] = min(best[route], time.perf_counter() - t0)
    route = min(best, key=best.get)
    _ROUTES[key] = route
    return route


def _merge(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Merge adjacent cores (r0, I, J, r) x (r, i, j, r1) -> (r0, I*i, J*j, r1), in fp32."""
    p = cores[0].float()
    for g in cores[1:]:
        r0, ip, jp, r = p.shape
        _, i, j, r1 = g.shape
        prod = (p.reshape(r0 * ip * jp, r) @ g.float().reshape(r, i * j * r1)).view(r0, ip, jp, i, j, r1)
        p = prod.permute(0, 1, 3, 2, 4, 5).reshape(r0, ip * i, jp * j, r1)
    return p


def mpo_linear_native(x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + bias on the CPU with the fused native chain (inference only).

    Args:
        x: [..., in_features], float32 or bfloat16, CPU. The output has x's dtype and leading dimensions.
        cores: MPO cores (r_{k-1}, i_k, j_k, r_k), all float32 or all bfloat16 (bf16 halves the bytes read; the
            kernel accumulates in fp32 either way), CPU.
        bias: [out_features] or None (any float dtype; added in fp32).

    Raises:
        RuntimeError: if the extension is not built, or if a gradient is required (use backend="torch").
        ValueError: for non-CPU tensors, unsupported dtypes, or cores of mixed dtypes.
    """
    if _ext is None:
        raise RuntimeError(f"mpo_linear(backend='native'): {is_available()[1]}")
    cores = list(cores)
    # Hot path: only the gradient check runs in Python (it must come before any merge builds a graph); the C++
    # entry checks everything else, and on failure _validate() re-checks here to raise a clear ValueError.
    if torch.is_grad_enabled() and (
        x.requires_grad or any(g.requires_grad for g in cores) or (bias is not None and bias.requires_grad)
    ):
        raise RuntimeError(
            "mpo_linear(backend='native') is forward-only (inference) and cannot give gradients; use "
            "backend='torch' for training, or run inference under torch.no_grad() / torch.inference_mode()"
        )
    if x.dim() == 0 or not cores:
        _validate(x, cores, bias)
    shapes = tuple(g.shape for g in cores)
    rows = x.numel() // max(1, x.shape[-1])
    groups, work = choose_groups(shapes, rows)
    if len(groups) < len(cores):
        _validate(x, cores, bias)  # merging runs torch ops first: check before, not after
        # merged cores are fp32 (merging bf16 values in bf16 would round them twice); the rest follow suit
        cores = [cores[a] if b - a == 1 else _merge(cores[a:b]) for a, b in groups]
        if any(g.dtype != cores[0].dtype for g in cores):
            cores = [g.float() for g in cores]
    route = _KERNEL
    if work >= _TUNE_MIN_FLOPS:
        key = (shapes, rows, x.dtype, cores[0].dtype, torch.get_num_threads())
        route = _ROUTES.get(key, 0)
    try:
        if route == 0:
            route = _pick_route(key, lambda r: _ext.mpo_chain_forward(x, cores, bias, r))
        return _ext.mpo_chain_forward(x, cores, bias, route)
    except RuntimeError:
        _validate(x, cores, bias)
        raise


def _validate(x: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None) -> None:
    """The argument checks with messages that say the fix (ValueError); shapes are checked by ops.check_mpo_cores."""
    if x.dim() == 0:
        raise ValueError("mpo_linear(backend='native'): x must have at least one dimension [..., in_features]")
    if not cores:
        raise ValueError("mpo_linear(backend='native'): needs at least one core")
    tensors = [("x", x), *((f"core {k}", g) for k, g in enumerate(cores))]
    if bias is not None:
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.device.type != "cpu":
            raise ValueError(
                f"mpo_linear(backend='native'): {name} is on {t.device}, but the native backend is CPU-only; "
                "use backend='torch' (or 'triton' on CUDA) for device tensors"
            )
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(
            f"mpo_linear(backend='native'): x has dtype {x.dtype}; the native kernel takes float32 or bfloat16 "
            "inputs; use backend='torch' for other dtypes (float64 references included)"
        )
    w_dtype = cores[0].dtype
    if w_dtype not in _WEIGHT_DTYPES or any(g.dtype != w_dtype for g in cores):
        raise ValueError(
            "mpo_linear(backend='native'): cores must all be float32 or all bfloat16, got "
            f"{[str(g.dtype) for g in cores]}; convert them with .float() or .bfloat16(), or use backend='torch'"
        )
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"mpo_linear(backend='native'): bias must be floating point, got {bias.dtype}")

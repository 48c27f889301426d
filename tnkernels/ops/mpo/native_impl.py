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
import math
import os
import time
from collections.abc import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ...plan.mpo import groupings
from ..modes import needs_autograd

try:  # the extension is optional: a missing or broken build only disables this backend
    # `import pkg.mod`, not `from pkg import mod`: while tnkernels is still initializing, the latter reports a
    # missing extension as "cannot import name ... (most likely due to a circular import)", which is_available()
    # then showed to the user; this form says "No module named 'tnkernels._native'".
    import tnkernels._native as _ext

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
    for groups in groupings(n):
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
    """FLOP-equivalent work of one native call with `rows` rows, for the planner to compare: the sweep of the
    schedule choose_schedule picks, plus the merges it pays per call when its pack does not fit the budget."""
    shapes = tuple(tuple(int(d) for d in g.shape) for g in cores)
    return choose_schedule(shapes, int(rows), cores[0].element_size(), True)[2]


# gemm routes of the compiled entry
_KERNEL, _ATEN = 1, 2
# Below this much work the fused kernel wins (ATen adds a gather copy and a call per step): no tuning. Measured
# (docs/native.md) on the grid's small layers the kernel route was 1.1-2.3x faster than the ATen one, so tuning there
# only risks a wrong pick: on a loaded machine one descheduled timing is enough to pick the slower route.
_TUNE_MIN_FLOPS = 2e7
# A single row is a matrix-vector product, bound by reading the cores: there MKL's GEMV (the ATen route) streams
# big cores faster than the kernel (low-rank 768->3072 at rank 307, 4.7 MB of cores: kernel 320 us, ATen 119 us;
# at 4 rows the kernel wins again, 323 against 364 us). So one-row calls over this many core bytes are tuned too.
_TUNE_MIN_ROW1_BYTES = 1 << 20
_TUNE_REPS = 5
# ATen must beat the kernel by this factor to be picked (the kernel is the default; a tie is noise).
_TUNE_MARGIN = 0.9
_ROUTES: dict[tuple, int] = {}


@functools.lru_cache(maxsize=4096)
def _core_numel(shapes: tuple) -> int:
    """Numbers in all cores: cached per shapes, since it is asked on the hot path of every one-row call."""
    return sum(math.prod(sh) for sh in shapes)


def route_cache() -> dict[tuple, str]:
    """The routes chosen so far: {(core shapes, rows, x dtype, core dtype, threads, direction, groups): "kernel" |
    "aten"}."""
    return {k: ("kernel" if v == _KERNEL else "aten") for k, v in _ROUTES.items()}


def _pick_route(key: tuple, run) -> int:
    """Time both routes on the real call (interleaved, best of _TUNE_REPS) and remember the faster one; ATen only
    when it is clearly faster (_TUNE_MARGIN)."""
    best = {_KERNEL: float("inf"), _ATEN: float("inf")}
    for _ in range(_TUNE_REPS):
        for route in best:
            t0 = time.perf_counter()
            run(route)
            best[route] = min(best[route], time.perf_counter() - t0)
    route = _ATEN if best[_ATEN] < _TUNE_MARGIN * best[_KERNEL] else _KERNEL
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


# ------------------------------------------------------------------------------------------------ pack cache
# Measured (docs/native.md): on small and middle-sized layers the per-call core merges cost as much as the sweep
# (the torch path pays them on every call too). An inference layer's cores do not change between calls, so the
# merged (and, for a right-to-left sweep, reversed) cores are kept per layer and rebuilt only when a core changes:
# the stamp holds each core's id, storage pointer, version counter, shape and dtype. The extra memory a layer may
# hold is bounded by a budget relative to its own cores (set_pack_budget): a schedule whose copies exceed it is
# still available, but then pays its merges on every call, as before.

_PACKS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # cores[0] -> _LayerPacks (dropped when the core dies)
_PACK_BUDGET = [float(os.environ.get("TNK_NATIVE_PACK_BUDGET", "1.0"))]


class _LayerPacks:
    __slots__ = ("stamp", "packs", "nbytes")

    def __init__(self, stamp: tuple) -> None:
        self.stamp = stamp
        self.packs: dict[tuple, list[torch.Tensor | int]] = {}  # int k: the layer's own core k, used as is
        self.nbytes = 0


def set_pack_budget(factor: float) -> None:
    """Extra memory the native backend may keep per layer for pre-merged / reversed cores, as a multiple of the
    layer's own core bytes (default 1.0, or TNK_NATIVE_PACK_BUDGET). 0 keeps nothing: merges then run every call."""
    if not factor >= 0:
        raise ValueError(f"set_pack_budget: factor must be >= 0, got {factor!r}")
    _PACK_BUDGET[0] = float(factor)
    choose_schedule.cache_clear()
    clear_pack_cache()


def clear_pack_cache() -> None:
    """Drop every cached pack (they are rebuilt on the next call)."""
    _PACKS.clear()


def pack_cache_bytes() -> int:
    """Memory held by cached packs, in bytes."""
    return sum(v.nbytes for v in _PACKS.values())


def _merged_shape(shapes: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    r0, big_i, big_j, _ = shapes[0]
    for _, i, j, _ in shapes[1:]:
        big_i, big_j = big_i * i, big_j * j
    return (r0, big_i, big_j, shapes[-1][3])


def _reverse_shapes(shapes: Sequence[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    return [(r1, i, j, r0) for r0, i, j, r1 in reversed(shapes)]


@functools.lru_cache(maxsize=4096)
def choose_schedule(
    shapes: tuple[tuple[int, int, int, int], ...], rows: int, core_bytes: int, can_cache: bool
) -> tuple[str, tuple[tuple[int, int], ...], float, tuple[int, ...]]:
    """(direction, groups, work, cached): the cheapest way for the kernel to run this chain at `rows` rows;
    `cached` lists the groups whose packed copy is kept per layer (empty: nothing is kept).

    Candidates are every contiguous grouping of cores, swept left to right or right to left (the kernel always
    sweeps left to right; "right" runs it on the reversed chain: core k becomes core N-1-k with its bonds swapped,
    and x / y are permuted by mode). A schedule whose copies fit the pack budget (and `can_cache`) is cached per
    layer, so its merges cost nothing per call; otherwise its merges are paid on every call (merge FLOPs + torch
    op overhead). With fp32 cores swept left to right, the merged groups that fit are kept and the rest merged per
    call (measured: GPT-2 XL at ratio 64 needs 1.27x its cores' bytes for both merges, so at budget 1.0 it paid
    both merges every call and ran at 0.8-0.9x the torch path). Right-to-left needs the reversed cores, so it is
    only a candidate when all of them are kept.
    Work is in FLOP-equivalents (core_bytes: bytes per core element, 4 or 2)."""
    n = len(shapes)
    params = sum(a * b * c * d for a, b, c, d in shapes)
    budget = _PACK_BUDGET[0] * params * core_bytes if can_cache else -1.0
    in_f = math.prod(s[1] for s in shapes)
    out_f = math.prod(s[2] for s in shapes)
    best: tuple[str, tuple[tuple[int, int], ...], float, tuple[int, ...]] | None = None
    for groups in groupings(n):
        merged = [shapes[a] if b - a == 1 else _merged_shape(shapes[a:b]) for a, b in groups]
        merge_work = sum(_merge_cost(shapes[a:b])[0] for a, b in groups if b - a > 1)
        any_merge = len(groups) < n
        merged_ids = [gi for gi, (a, b) in enumerate(groups) if b - a > 1]
        every = tuple(range(len(groups)))
        sizes = [4 * math.prod(m) for m in merged]  # bytes of each group's fp32 copy
        candidates: list[tuple[str, float, tuple[int, ...]]] = []
        # left to right: which merged groups to keep (bytes within the budget) and which to merge per call
        sweep = _sweep_flops_shapes(merged, rows)
        if core_bytes == 4:
            for mask in range(1 << len(merged_ids)):
                kept = tuple(gi for t, gi in enumerate(merged_ids) if mask >> t & 1)
                if kept and sum(sizes[gi] for gi in kept) > budget:
                    continue
                per_call = sum(
                    _merge_cost(shapes[a:b])[0] for gi, (a, b) in enumerate(groups) if gi not in kept and b > a + 1
                )
                candidates.append(("left", sweep + per_call, kept))
        else:  # bf16: once any core is merged, every core of the pack is an fp32 copy: all kept, or none
            candidates.append(("left", sweep + merge_work, ()))
            if any_merge and sum(sizes) <= budget:
                candidates.append(("left", sweep, every))
        # right to left: the reversed copies of every group are kept, or the schedule is not a candidate
        if sum(sizes if any_merge else [core_bytes * math.prod(m) for m in merged]) <= budget:
            # two permute copies (x and y) and their op overhead per call
            work = _sweep_flops_shapes(_reverse_shapes(merged), rows) + 2 * (_OP_OVERHEAD_FLOPS + rows * (in_f + out_f))
            candidates.append(("right", work, every))
        for direction, work, kept in candidates:
            if best is None or work < best[2]:
                best = (direction, tuple(groups), work, kept)
    assert best is not None
    return best


def _stamp(cores: Sequence[torch.Tensor]) -> tuple | None:
    """What identifies the values of `cores` for the pack cache; None when they cannot be tracked (inference
    tensors carry no version counter, so an in-place change would go unseen)."""
    try:
        return tuple((id(g), g.data_ptr(), g._version, g.shape, g.stride(), g.dtype) for g in cores)
    except RuntimeError:
        return None


def _build_pack(cores: Sequence[torch.Tensor], direction: str, groups) -> list[torch.Tensor]:
    """The cores the kernel sweeps for this schedule: groups merged (fp32), reversed for a right-to-left sweep."""
    with torch.no_grad():
        packed = [cores[a] if b - a == 1 else _merge(cores[a:b]) for a, b in groups]
        if any(g.dtype != packed[0].dtype for g in packed):
            packed = [g.float() for g in packed]
        if direction == "right":
            packed = [g.permute(3, 1, 2, 0).contiguous() for g in reversed(packed)]
    return packed


def _packed_cores(cores: list[torch.Tensor], direction: str, groups, cached: tuple[int, ...]) -> list[torch.Tensor]:
    """The cores to sweep: the kept part of the pack from the layer's cache (built on a miss or after a core
    changed), the rest merged now."""
    stamp = _stamp(cores) if cached else None
    if stamp is None:
        return _build_pack(cores, direction, groups)
    entry = _PACKS.get(cores[0])
    if entry is None or entry.stamp != stamp:
        entry = _LayerPacks(stamp)
        _PACKS[cores[0]] = entry
    key = (direction, groups, cached)
    stored = entry.packs.get(key)
    if stored is None:
        if len(cached) == len(groups):
            pack = _build_pack(cores, direction, groups)
            # A core used as is is stored as its index, never as the tensor: the entry must not keep the layer's
            # own cores alive (cores[0] is the weak key, so a strong reference to it would keep the entry forever).
            stored = [next((k for k, c in enumerate(cores) if g is c), g) for g in pack]
        else:  # fp32, left to right: keep the merged groups listed; None = a single core, or merged per call
            with torch.no_grad():
                stored = [_merge(cores[a:b]) if gi in cached else None for gi, (a, b) in enumerate(groups)]
        nbytes = sum(g.numel() * g.element_size() for g in stored if isinstance(g, torch.Tensor))
        budget = _PACK_BUDGET[0] * sum(g.numel() * g.element_size() for g in cores)
        if entry.nbytes + nbytes > budget:  # another row count's schedule is cached: keep only the newest
            entry.packs.clear()
            entry.nbytes = 0
        entry.packs[key] = stored
        entry.nbytes += nbytes
    out = []
    for g, (a, b) in zip(stored, groups):
        if isinstance(g, int):
            out.append(cores[g])
        elif g is not None:
            out.append(g)
        elif b - a == 1:
            out.append(cores[a])
        else:
            with torch.no_grad():
                out.append(_merge(cores[a:b]))
    return out


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
    if needs_autograd(x, cores, bias):
        raise RuntimeError(
            "mpo_linear(backend='native') is forward-only (inference) and cannot give gradients; use "
            "backend='torch' for training, or run inference under torch.no_grad() / torch.inference_mode()"
        )
    if x.dim() == 0 or not cores:
        _validate(x, cores, bias)
    shapes = tuple(g.shape for g in cores)
    in_f = x.shape[-1]
    rows = x.numel() // max(1, in_f)
    can_cache = not any(g.is_inference() for g in cores)
    direction, groups, work, cached = choose_schedule(shapes, rows, cores[0].element_size(), can_cache)
    xin, b_in = x, bias
    if len(groups) < len(cores) or direction == "right":
        _validate(x, cores, bias)  # merging runs torch ops first: check before, not after
        if x.shape[-1] != math.prod(g.shape[1] for g in cores):
            raise ValueError(f"mpo_linear(backend='native'): x has {in_f} features, the cores expect another count")
        packed = _packed_cores(cores, direction, groups, cached)
    else:
        packed = cores
    if direction == "right":
        # the reversed chain maps x with its (merged) input modes reversed to y with its output modes reversed
        in_modes = [g.shape[1] for g in reversed(packed)]
        n = len(packed)
        xin = x.reshape(rows, *in_modes).permute(0, *range(n, 0, -1)).reshape(rows, in_f)
        b_in = None
    route = _KERNEL
    big_matvec = rows == 1 and _core_numel(shapes) * cores[0].element_size() >= _TUNE_MIN_ROW1_BYTES
    if work >= _TUNE_MIN_FLOPS or big_matvec:
        key = (shapes, rows, x.dtype, cores[0].dtype, torch.get_num_threads(), direction, groups)
        route = _ROUTES.get(key, 0)
    try:
        if route == 0:
            route = _pick_route(key, lambda r: _ext.mpo_chain_forward(xin, packed, b_in, r))
        y = _ext.mpo_chain_forward(xin, packed, b_in, route)
    except RuntimeError:
        _validate(x, cores, bias)
        raise
    if direction == "right":
        out_modes = [g.shape[2] for g in packed]  # y's modes in the reversed chain's order
        n = len(packed)
        y_view = y.view(rows, *out_modes).permute(0, *range(n, 0, -1))
        out = torch.empty((*x.shape[:-1], y.shape[-1]), dtype=y.dtype)
        target = out.view(rows, *reversed(out_modes))
        if bias is None:
            target.copy_(y_view)
        else:
            torch.add(y_view, bias.to(y.dtype).view(*reversed(out_modes)), out=target)
        return out
    return y


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

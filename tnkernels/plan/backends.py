"""Which backend `backend="auto"` should run for one MPO call: a hook for tnkernels.ops.dispatch.

Backends are reached only through `tnkernels.ops.dispatch.backend_available`, so a backend that is not built or not
importable is simply not a candidate.

    CUDA tensor             -> "torch" (the planned path). The Triton kernels pass their tests under the CPU
                               interpreter but have not yet been run on a GPU; until bench/gpu_bench.py has checked
                               them on real hardware they are opt-in (backend="triton", or TNK_AUTO_TRITON=1).
    CPU, forward only,      -> "native" when available, for float32 / bfloat16 and at most NATIVE_MAX_ROWS rows
    small row count            (the C++ kernel keeps a chunk's intermediates in cache and skips per-op dispatch)
    low-rank chain          -> "torch": modes (in, 1) x (1, out) are two plain GEMMs there. Measured through
                               mpo_linear (2026-12-01, one thread, 20 layer/ratio pairs of the grid shapes):
                               at 8 rows torch is ahead in 16 of 20 (0.86-2.35x; 3072x768 at 2x: 250 against
                               587 us), at one row in 10 of 20 (0.78-1.99x); where the kernel is ahead the
                               layers are tiny and it gains at most 3 us, where torch is ahead it saves up to
                               337 us
    otherwise               -> "torch" (the planned path; the only one with a backward on CPU)

NATIVE_MAX_ROWS comes from side-by-side measurements on this project's shared 2-core CI machine (one thread).
The latest (docs/native.md, bench/results/native_cpu_1thread.md: CPU time per call, 28 grid layers, load ~10):
median speed-up of native over the planned torch path 1.54x at 1 row, 1.06x at 4, 0.97x at 16 and 0.98x at 64 rows,
so native pays up to a few rows and is a wash beyond. Re-measure with bench/bench_native.py on other hardware.
"""

from __future__ import annotations

import os

import torch

NATIVE_MAX_ROWS = 8
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _available(backend: str) -> bool:
    from ..ops.dispatch import backend_available  # cached there: no import on the forward path

    return backend_available("mpo_linear", backend)[0]


def auto_mpo_backend(device_type: str, rows: int, dtype: torch.dtype, needs_grad: bool, low_rank: bool = False) -> str:
    """The backend name ("torch", "triton" or "native") that backend="auto" should resolve to for this call.
    `low_rank`: the chain has modes (in, 1) x (1, out) (see the module docstring)."""
    if device_type == "cuda":
        return "triton" if os.environ.get("TNK_AUTO_TRITON") == "1" and _available("triton") else "torch"
    if low_rank:
        return "torch"
    if device_type == "cpu" and not needs_grad and rows <= NATIVE_MAX_ROWS and dtype in _NATIVE_DTYPES:
        if _available("native"):
            return "native"
    return "torch"

"""The low-rank path's products on the csrc/ thin-GEMM kernels, where they beat the CPU BLAS; torch elsewhere.

At small ranks the two products of y = (x A) B + bias are memory-bound, and the CPU BLAS leaves about half the
bandwidth unused (csrc/thin_gemm.cpp). Measured per product, one thread, 2026-12-01 (`docs/native.md` has the
table and the command), the native kernels win at ranks up to 8:

* x A with A [in, r] as stored: 1.1-1.9x at 128 rows and more. Below that the per-call transposed copy of A that
  the kernel reads (in * r numbers) costs more than it saves (64 rows, rank 8: 24 against 21 us).
* dy B^T (the backward's dh): B^T is a free view of what the kernel reads; within a microsecond either way at
  1-8 rows, 1.0-3.7x from 64 rows up. Here the bound is rank 10, because the CPU BLAS is slower on this
  transposed product than on x A: at rank 9 the kernel measured 1.07-1.66x, at rank 10 0.99-1.55x, at rank 12
  0.86-1.42x (64-1024 rows, 512-3072 inputs, 2026-12-01); the same kernel on x A at ranks 9-10 measured 0.70-1.08x.
* h B + bias: 1.1-2.3x against addmm at every row count, the bias written with the output instead of addmm's
  copy-then-GEMM. Against the bias fold (torch_low_rank) it wins at rank 4 but not at rank 9 (768 -> 3072, 1024
  rows, through MPOLinear: 920 us with the fold, 971 with the kernel), so the bound is the same 8.

Everything else (dx = dh A^T, dA, dB, larger ranks, other dtypes and devices) stays on torch, which measured as
fast or faster. The kernels are plain C++ calls, invisible to autograd and to torch.compile: the callers use them
inside their own autograd.Function or under no_grad, and never while compiling (a graph break otherwise).
"""

from __future__ import annotations

import torch

try:  # the extension is optional (native_impl.py explains the build)
    from tnkernels import _native as _ext

    _HAS_THIN = hasattr(_ext, "thin_project")
except ImportError:  # pragma: no cover - depends on how the package was installed
    _HAS_THIN = False

MAX_RANK = 8
TRANSPOSED_MAX_RANK = 10  # dy B^T (B^T a free view of a contiguous B): the BLAS is slower there, see above
PROJECT_MIN_ROWS = 128  # x A with A as stored: below this the transposed copy of A costs more than the kernel saves

enabled = _HAS_THIN  # a switch for A/B timing and for tests of the torch fallbacks


def _usable(big: torch.Tensor) -> bool:
    return (
        big.dtype == torch.float32
        and big.device.type == "cpu"
        and big.is_contiguous()
        and not torch.compiler.is_compiling()
    )


# The cheap tests come first: at one row the whole call takes a few microseconds, and these checks are on its path.
def project(x2d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x2d @ a for a [in, r] (a contiguous A, or B.t() whose transpose is contiguous)."""
    rank = a.shape[1]
    if enabled and rank <= TRANSPOSED_MAX_RANK and a.dtype == torch.float32 and _usable(x2d):
        if a.stride(0) == 1 and a.stride(1) == a.shape[0]:  # a = B.t(), B contiguous: no copy for the kernel
            return _ext.thin_project(x2d, a)
        if rank <= MAX_RANK and x2d.shape[0] >= PROJECT_MIN_ROWS:
            return _ext.thin_project(x2d, a)
    return x2d @ a


def expand_with_bias(h: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """h @ b + bias in one pass over the output, or None where the native kernel does not apply."""
    if (
        enabled
        and b.shape[0] <= MAX_RANK
        and b.dtype == bias.dtype == torch.float32
        and _usable(h)
        and b.is_contiguous()
        and bias.is_contiguous()
    ):
        return _ext.thin_expand(h, b, bias)
    return None

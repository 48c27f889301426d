"""The low-rank path's products on the csrc/ thin-GEMM kernels, where they beat the CPU BLAS; torch elsewhere.

At small ranks the products of y = (x A) B + bias and of its backward are memory-bound, and the CPU BLAS can
leave most of the bandwidth unused (csrc/thin_gemm.cpp). Where the kernels win depends on the CPU: on the Xeon VM
(2026-12-01) MKL was fast enough that they won only at ranks <= 8-10, on the EPYC VM (2026-12-02) MKL's slow path
on AMD made them win up to rank 19 and beyond, by up to 7x, but not at every width. So each choice here reads
thin_bounds' table, measured on this machine: the product, its rank, width and row count decide.

* x A with A [in, r] as stored (`project`): the kernel reads A^T, one copy of in * r numbers per call.
* dy B^T, the backward's dh (`project_t`): B^T is a free view of what the kernel reads.
* h B + bias (`expand`): the bias written with the output instead of addmm's copy-then-GEMM.
* dh A^T, the backward's dx (`expand_t`): one copy of A^T per call.
* h^T dy, the backward's dB (`reduce`): a reduction over rows, split by output columns; with [h, 1] it gives
  the bias gradient in the same pass over dy.
* x^T dh, the backward's dA (`grad_a`): the same reduction with H = dh and D = x, written in the parameter's
  layout; where torch runs it instead, the table also picks its layout (`grad_a_t`, torch_low_rank).

The kernels are plain C++ calls, invisible to autograd and to torch.compile: the callers use them inside their own
autograd.Function or under no_grad, and never while compiling (a graph break otherwise).
"""

from __future__ import annotations

import torch

from . import thin_bounds

try:  # the extension is optional (native_impl.py explains the build)
    from tnkernels import _native as _ext

    _HAS_THIN = hasattr(_ext, "thin_project")
except ImportError:  # pragma: no cover - depends on how the package was installed
    _HAS_THIN = False

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
    """x2d @ a for a [in, r]: a contiguous A, or B.t() whose transpose is contiguous."""
    if enabled and a.dtype == torch.float32 and _usable(x2d):
        # a = B.t() of a contiguous B (no copy for the kernel): read from the strides, a.t() would build a view
        kind = "project_t" if a.stride(0) == 1 and a.stride(1) == a.shape[0] else "project"
        if thin_bounds.bounds().wins(kind, x2d.shape[0], a.shape[1], x2d.shape[1]):
            return _ext.thin_project(x2d, a)
    return x2d @ a


def expand_with_bias(h: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """h @ b + bias in one pass over the output, or None where the native kernel does not apply."""
    if (
        enabled
        and b.dtype == bias.dtype == torch.float32
        and _usable(h)
        and b.is_contiguous()
        and bias.is_contiguous()
        and thin_bounds.bounds().wins("expand", h.shape[0], b.shape[0], b.shape[1])
    ):
        return _ext.thin_expand(h, b, bias)
    return None


def reduce(h: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """h.t() @ dy (the backward's dB; with h = [h, 1], dB and the bias gradient in one pass over dy)."""
    if enabled and _usable(dy) and _usable(h) and thin_bounds.bounds().wins("reduce", *h.shape, dy.shape[1]):
        return _ext.thin_reduce(h, dy)
    return h.t() @ dy


def grad_a(x2d: torch.Tensor, dh: torch.Tensor) -> torch.Tensor | None:
    """x2d.t() @ dh, [in, r] contiguous (the backward's dA in the parameter's layout), or None where torch should
    run it (torch_low_rank then picks its layout)."""
    if enabled and _usable(x2d) and _usable(dh) and thin_bounds.bounds().wins("grad_a", *dh.shape, x2d.shape[1]):
        return _ext.thin_reduce(dh, x2d, True)
    return None


def expand_transposed(dh: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """dh @ a.t() for a [in, r] (the backward's dx = dh A^T)."""
    if (
        enabled
        and a.dtype == torch.float32
        and _usable(dh)
        and thin_bounds.bounds().wins("expand_t", *dh.shape, a.shape[0])
    ):
        return _ext.thin_expand(dh, a.t())
    return dh @ a.t()

"""Gradients returned in their parameters' layout (autograd's "gradient layout contract").

A backward may compute a parameter's gradient transposed or permuted (a GEMM in the faster orientation, a
convolution's weight gradient in oneDNN's layout). Autograd accepts such a gradient but copies it into the
parameter's strides before accumulating, and DistributedDataParallel warns that it does not match its buckets. One
copy here instead, only where the strides differ, keeps both quiet and costs the same.
"""

from __future__ import annotations

import torch


def in_layout_of(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor | None:
    """`grad` with `param`'s strides: itself when they already match, else one copy. Under torch.compile the
    gradient is left as it is: strides are the compiler's business there, and comparing them breaks the graph."""
    if grad is None or torch.compiler.is_compiling() or grad.stride() == param.stride():
        return grad
    return torch.empty_strided(param.shape, param.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)

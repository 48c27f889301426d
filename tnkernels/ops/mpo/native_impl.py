"""Native (C++) CPU backend for the MPO chain: small-batch inference in one call.

The compiled kernel lives in csrc/mpo_chain.cpp and is built by setup.py as `tnkernels._native` (optional: the
package works without it). It sweeps the cores left to right, one small GEMM per core, with every intermediate of a
chunk of rows kept in cache and fp32 accumulation; cores may be float32 or bfloat16. Forward only: training goes
through backend="torch".

Cost behaviour (for the planner): the FLOPs are those of the left-to-right sweep, `sweep_flops(cores, rows)`, with
no Python dispatch per core (one call per layer, ~10 us fixed cost). It is the fastest CPU path at a few rows; at
many rows the per-core GEMMs are not blocked as well as MKL's, so the planned torch path can win there.
"""

from __future__ import annotations

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
    ok, why = is_available()
    if not ok:
        raise RuntimeError(f"mpo_linear(backend='native'): {why}")
    cores = list(cores)
    if torch.is_grad_enabled() and (
        x.requires_grad or any(g.requires_grad for g in cores) or (bias is not None and bias.requires_grad)
    ):
        raise RuntimeError(
            "mpo_linear(backend='native') is forward-only (inference) and cannot give gradients; use "
            "backend='torch' for training, or run inference under torch.no_grad() / torch.inference_mode()"
        )
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
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    cores_c = [g if g.is_contiguous() else g.contiguous() for g in cores]
    y = _ext.mpo_chain_forward(x2, cores_c, bias)
    return y.reshape(*lead, y.shape[-1])

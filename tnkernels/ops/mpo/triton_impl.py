"""Triton backend for the MPO chain: launchers, the torch.library op with its autograd, and the backend entry.

Forward: one `mode_product_kernel` launch per core. The state is kept row-major as [rows * J_done, r * I_rest]
and each step reads it as a 3-way tensor [P, r_prev * i_k, Q] and writes [P, j_k * r_k, Q] (see triton_kernels.py),
so no permuted copy of the state is ever made; the bias is added in the last step's epilogue.

Backward: with S_k the input of step k (saved), G_k as a matrix B_k[r_prev * i_k, j_k * r_k] and dS the gradient of
step k's output,
    dG_k      = sum over (p, q) of S_k[p, :, q]^T dS[p, :, q]        (mode_product_grad_b_kernel)
    dS_{k-1}  = dS x_2 B_k^T                                         (mode_product_kernel, B_k's strides swapped)
i.e. the transposed chain run right to left, with the left environments being the saved forward states. The bias
gradient is a plain column sum.

The op is registered with torch.library (custom_op + fake + autograd), so torch.compile sees one opaque node instead
of a graph break at the Triton launch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

from ..modes import needs_autograd

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton

    from .triton_kernels import mode_product_grad_b_kernel, mode_product_kernel, mode_product_pair_kernel

    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the install
    triton = None
    _IMPORT_ERROR = f"triton cannot be imported ({exc})"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_available() -> tuple[bool, str]:
    """(True, "") when Triton kernels can run here: a CUDA GPU, or the CPU interpreter (TRITON_INTERPRET=1)."""
    if _IMPORT_ERROR:
        return False, _IMPORT_ERROR
    if _INTERPRET or torch.cuda.is_available():
        return True, ""
    return (
        False,
        "no CUDA device and TRITON_INTERPRET is not 1 (set it before triton is imported to use the CPU)",
    )


def check_device(t: torch.Tensor, where: str) -> None:
    """Raise a clear error when `t` lives where the Triton kernels cannot run (or has an unsupported dtype)."""
    if t.dtype not in _DTYPES:
        raise ValueError(
            f"{where}: dtype {t.dtype} is not supported by the triton backend; use float16/bfloat16/"
            "float32/float64 or backend='torch'"
        )
    if t.device.type == "cuda" or (_INTERPRET and t.device.type == "cpu"):
        return
    raise ValueError(
        f"{where}: the triton backend needs a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got a tensor "
        f"on {t.device}; move it with .cuda() or use backend='torch'"
    )


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU the current device for the launches inside (a no-op off CUDA).

    Triton launches on torch's *current* device and its current stream, not on the device of the tensors it is
    given. Without this guard, a layer on cuda:1 (e.g. a model split over GPUs with device_map="auto") runs while
    cuda:0 is current: an illegal address, or a kernel on the wrong GPU and stream, unordered with cuda:1's work.
    One guard per op call (the torch.library ops below), not per launch, to keep decode-size latency low.
    """
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every reduction: fp32, or fp64 for fp64 (never down to fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flags(dtype: torch.dtype) -> dict:
    """Compile-time switches shared by every launch: fp64 path, upcast of half tiles, fp32 dot precision."""
    # fp32 follows torch's own matmul setting so the triton and torch backends agree on TF32 vs IEEE.
    tf32 = (not _INTERPRET) and torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT_FP64": dtype == torch.float64,
        "UPCAST": _INTERPRET,
        "PRECISION": "tf32" if tf32 else "ieee",
    }


def check_rows(m: int, where: str) -> None:
    """The kernels number output rows (pixels, (p, q) pairs) with int32 program ids and tl.arange, as triton does;
    memory offsets are int64. Refuse row counts past int32 instead of computing garbage addresses."""
    if m > 2**31 - 1 - 256:  # 256: the largest BM, so that i_m * BM + arange(BM) cannot wrap either
        raise ValueError(
            f"{where}: {m} rows (batch x positions) exceed the triton kernels' int32 row index; split the batch"
        )


def _bucket(m: int) -> int:
    """Size class of a row count for the autotune key: powers of 4 up to 4**9, so a model's many batch sizes
    share a handful of tuned configs."""
    b = 16
    while b < m and b < 4**9:
        b *= 4
    return b


def mode_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, bias_mod: int = 1) -> torch.Tensor:
    """out[p, n, q] = sum_k a[p, k, q] * b[k, n] (+ bias[(p % bias_mod) * N + n]), out fresh and contiguous.

    a: [P, K, Q] and b: [K, N], any strides (transposes and permutations cost nothing). Returns [P, N, Q] in a.dtype.
    """
    P, K, Q = a.shape
    N = b.shape[1]
    out = torch.empty((P, N, Q), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    M = P * Q
    check_rows(M, "mode_product")

    def grid(meta):
        # One axis: CUDA limits grid axes 1 and 2 to 65535, and N has no such bound (see the kernel).
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    mode_product_kernel[grid](
        a, b, bias if bias is not None else a, out,
        P, K, N, Q, _bucket(M),
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        bias_mod,
        HAS_BIAS=bias is not None, **_flags(a.dtype),
    )  # fmt: skip
    return out


def mode_product_pair(
    a: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    j1: int,
    i2: int,
    bias: torch.Tensor | None = None,
    bias_mod: int = 1,
) -> torch.Tensor:
    """Two chained mode products in one kernel (see mode_product_pair_kernel), the intermediate kept on chip.

    a: [P, K1, I2*Q2]; b1: [K1, J1*R1]; b2: [R1*I2, N2]. Returns contiguous [P*J1, N2, Q2], equal to
    mode_product(mode_product(a, b1).reshape(P*J1, R1*I2, Q2), b2, bias, bias_mod).
    """
    P, K1, Q1 = a.shape
    R1 = b1.shape[1] // j1
    Q2 = Q1 // i2
    N2 = b2.shape[1]
    out = torch.empty((P * j1, N2, Q2), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    M = P * Q2
    check_rows(M, "mode_product_pair")

    def grid(meta):
        # j1 is folded into axis 0 (see the kernel): CUDA limits grid axes 1 and 2 to 65535.
        return (triton.cdiv(M, meta["BM"]) * j1, triton.cdiv(N2, meta["BN2"]))

    mode_product_pair_kernel[grid](
        a, b1, b2, bias if bias is not None else a, out,
        P, K1, j1, R1, i2, Q2, N2, _bucket(M),
        a.stride(0), a.stride(1), a.stride(2),
        b1.stride(0), b1.stride(1),
        b2.stride(0), b2.stride(1),
        bias_mod,
        HAS_BIAS=bias is not None, **_flags(a.dtype),
    )  # fmt: skip
    return out


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter gains nothing from more programs


def mode_product_grad_b(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """db[k, n] = sum_{p, q} a[p, k, q] * g[p, n, q] for a: [P, K, Q], g: [P, N, Q]; returned in a.dtype."""
    P, K, Q = a.shape
    N = g.shape[1]
    acc_dtype = _acc_dtype(a.dtype)
    M = P * Q
    if M == 0 or K == 0 or N == 0:
        return torch.zeros((K, N), device=a.device, dtype=a.dtype)
    check_rows(M, "mode_product_grad_b")
    # Split the (p, q) reduction into S slices (multiples of 256 rows, a multiple of every config's BM) so that
    # small weight matrices still give the GPU ~4 programs per SM; partials are summed below in fp32/fp64.
    unit = 256
    tiles = triton.cdiv(K, 64) * triton.cdiv(N, 64)
    splits = max(1, min(triton.cdiv(M, unit), (4 * _num_sms(a.device)) // tiles))
    per_split = triton.cdiv(triton.cdiv(M, splits), unit) * unit
    splits = triton.cdiv(M, per_split)
    partial = torch.empty((splits, K, N), device=a.device, dtype=acc_dtype)

    def grid(meta):
        return (triton.cdiv(K, meta["BK"]) * triton.cdiv(N, meta["BN"]), splits)  # (k, n) tiles folded, see kernel

    mode_product_grad_b_kernel[grid](
        a, g, partial,
        P, K, N, Q, _bucket(M), per_split,
        a.stride(0), a.stride(1), a.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        **_flags(a.dtype),
    )  # fmt: skip
    return partial.sum(0).to(a.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The chain


def _step_shapes(in_features: int, shapes: Sequence[Sequence[int]]) -> list[tuple[int, int, int, int]]:
    """Per step k: (J_done before k, K = r_prev * i_k, N = j_k * r_k, Q = input modes left after k)."""
    out, j_done, rest = [], 1, in_features
    for r0, i, j, r1 in shapes:
        rest //= i
        out.append((j_done, r0 * i, j * r1, rest))
        j_done *= j
    return out


# Two steps k, k+1 are fused when step k+1's output width N = j_{k+1} * r_{k+1} is at most this: the pair kernel
# recomputes its on-chip intermediate once per N block, so wide second steps are better left unfused.
_PAIR_MAX_N2 = 128


def _fusion_plan(steps: Sequence[tuple[int, int, int, int]]) -> list[int]:
    """Indices k of the steps fused with step k+1 (inference only). Pairs are chosen greedily by the size of the
    intermediate they keep off memory (J_done * N * Q of step k per row), without overlapping."""
    candidates = [k for k in range(len(steps) - 1) if steps[k + 1][2] <= _PAIR_MAX_N2]
    candidates.sort(key=lambda k: -(steps[k][0] * steps[k][2] * steps[k][3]))
    taken: set[int] = set()
    plan = []
    for k in candidates:
        if k not in taken and k + 1 not in taken:
            taken |= {k, k + 1}
            plan.append(k)
    return sorted(plan)


def _forward_chain(
    x2: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None, keep: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x2 [rows, in] (any strides) -> (y [rows, out] contiguous, outputs of steps 0..N-2 as [P, N, Q]).

    keep=True (training): one launch per step, every intermediate kept for the backward. keep=False (inference):
    consecutive steps are fused where _fusion_plan says so, and nothing is kept (the list comes back empty).
    """
    rows = x2.shape[0]
    steps = _step_shapes(x2.shape[1], [g.shape for g in cores])
    fused = set() if keep else set(_fusion_plan(steps))
    bias = bias.contiguous() if bias is not None else None  # indexed as bias[f] by the kernels (no stride argument)
    # Step 0 reads x2 as [rows, i_1, rest] through x2's own strides: no copy, even when x2 is transposed.
    state = x2.unflatten(1, (steps[0][1], steps[0][3]))
    kept = []
    n = len(cores)
    k = 0
    while k < n:
        j_done, K, N, Q = steps[k]
        a = state.reshape(rows * j_done, K, Q) if k else state
        if k in fused:
            g, g2 = cores[k], cores[k + 1]
            last = k + 1 == n - 1
            out = mode_product_pair(
                a, g.reshape(K, N), g2.reshape(steps[k + 1][1], steps[k + 1][2]), g.shape[2], g2.shape[1],
                bias if last else None, bias_mod=steps[k + 1][0],
            )  # fmt: skip
            k += 2
        else:
            last = k == n - 1
            out = mode_product(a, cores[k].reshape(K, N), bias if last else None, bias_mod=j_done)
            if keep and not last:
                kept.append(out)
            k += 1
        state = out
    return state.reshape(rows, steps[-1][0] * steps[-1][2]), kept


def _backward_chain(
    grad_y: torch.Tensor,
    x2: torch.Tensor,
    cores: Sequence[torch.Tensor],
    kept: Sequence[torch.Tensor],
    need_dx: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Gradients of the chain (bias excluded) from grad_y [rows, out]."""
    rows = x2.shape[0]
    steps = _step_shapes(x2.shape[1], [g.shape for g in cores])
    inputs = [x2.unflatten(1, (steps[0][1], steps[0][3]))]
    inputs += [s.reshape(rows * jd, K, Q) for s, (jd, K, _, Q) in zip(kept, steps[1:], strict=True)]
    j_done, K, N, Q = steps[-1]
    d_state = grad_y.contiguous().reshape(rows * j_done, N, Q)
    d_cores: list[torch.Tensor] = [None] * len(cores)  # type: ignore[list-item]
    dx = None
    for k in range(len(cores) - 1, -1, -1):
        g = cores[k]
        j_done, K, N, Q = steps[k]
        d_cores[k] = mode_product_grad_b(inputs[k], d_state).reshape(g.shape)
        if k == 0 and not need_dx:
            break
        # dS_in[p, k, q] = sum_n dS[p, n, q] * B[k, n]: B^T is B with strides swapped, no copy.
        d_in = mode_product(d_state, g.reshape(K, N).t())
        if k == 0:
            dx = d_in.reshape(x2.shape)
        else:
            jd_prev, _, n_prev, q_prev = steps[k - 1]
            d_state = d_in.reshape(rows * jd_prev, n_prev, q_prev)
    return dx, d_cores


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, differentiable through register_autograd.


@torch.library.custom_op("tnkernels::mpo_linear_triton", mutates_args=())
def _mpo_op(x2: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None, keep: bool) -> list[torch.Tensor]:
    """Returns [y, kept states...]; the states only feed the backward (outputs may not alias inputs, so x2 is not
    among them) and are only produced when keep (see _forward_chain)."""
    with device_guard(x2):
        y, kept = _forward_chain(x2, cores, bias, keep)
    return [y, *kept]


@_mpo_op.register_fake
def _(x2, cores, bias, keep):
    rows = x2.shape[0]
    steps = _step_shapes(x2.shape[1], [g.shape for g in cores])
    out_features = steps[-1][0] * steps[-1][2]
    kept = [x2.new_empty((rows * jd, N, Q)) for jd, _, N, Q in steps[:-1]] if keep else []
    return [x2.new_empty((rows, out_features)), *kept]


@torch.library.custom_op("tnkernels::mpo_linear_triton_backward", mutates_args=())
def _mpo_backward_op(
    grad_y: torch.Tensor, x2: torch.Tensor, cores: list[torch.Tensor], kept: list[torch.Tensor], need_dx: bool
) -> list[torch.Tensor]:
    """Returns [dx (empty when not needed), d_core_0, ..., d_core_{N-1}]."""
    with device_guard(x2):
        dx, d_cores = _backward_chain(grad_y, x2, cores, kept, need_dx)
    return [dx if dx is not None else x2.new_empty((0,)), *d_cores]


@_mpo_backward_op.register_fake
def _(grad_y, x2, cores, kept, need_dx):
    dx = x2.new_empty(x2.shape) if need_dx else x2.new_empty((0,))
    return [dx, *[g.new_empty(g.shape) for g in cores]]


def _setup_context(ctx, inputs, output):
    x2, cores, bias, keep = inputs
    ctx.keep = keep
    ctx.n_cores = len(cores)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x2, *cores, *output[1:])


def _backward(ctx, grads):
    if not ctx.keep:
        raise RuntimeError(
            "tnkernels::mpo_linear_triton was called with keep=False, so its intermediates were not kept; "
            "call it through mpo_linear(..., backend='triton'), which keeps them whenever a gradient can follow"
        )
    saved = ctx.saved_tensors
    n = ctx.n_cores
    x2, cores, kept = saved[0], list(saved[1 : 1 + n]), list(saved[1 + n :])
    grad_y = grads[0]
    need_dx = ctx.needs_input_grad[0]
    res = _mpo_backward_op(grad_y, x2, cores, kept, need_dx)
    dx = res[0] if need_dx else None
    # fp32 accumulation for the bias gradient (fp64 for fp64: a fp32 sum would cap fp64 gradients at ~1e-7).
    d_bias = grad_y.sum(0, dtype=_acc_dtype(grad_y.dtype)).to(grad_y.dtype) if ctx.has_bias else None
    return dx, list(res[1:]), d_bias, None


torch.library.register_autograd("tnkernels::mpo_linear_triton", _backward, setup_context=_setup_context)


def refuse_double_backward(backward_op: str, layer: str) -> None:
    """Make a gradient through a Triton backward op (create_graph=True, then a second backward) fail with the
    fix in the message, instead of torch.library's generic "no autograd formula"."""

    def refuse(ctx, *grads):
        raise NotImplementedError(
            f"{layer}(backend='triton') has no double backward (a gradient of a gradient: create_graph=True); "
            "run this layer with backend='torch' (or 'auto'), whose every plan differentiates to any order"
        )

    torch.library.register_autograd(backward_op, refuse)


refuse_double_backward("tnkernels::mpo_linear_triton_backward", "MPOLinear / mpo_linear")


def mpo_linear_triton(x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """Backend entry: y = x @ W.T + bias with the MPO `cores` (validated by tnkernels.ops.mpo_linear).

    x: [..., in_features] on CUDA (or CPU under TRITON_INTERPRET=1), float16/bfloat16/float32/float64. Cores and bias
    are cast to x's dtype (differentiably, like autocast) so mixed-precision modules work. Differentiable in x,
    every core and the bias; double backward is not supported.
    """
    check_device(x, "mpo_linear(backend='triton')")
    cores = [g if g.dtype == x.dtype else g.to(x.dtype) for g in cores]
    for k, g in enumerate(cores):
        if g.device != x.device:
            raise ValueError(
                f"mpo_linear(backend='triton'): core {k} is on {g.device} but x is on {x.device}; "
                "move the module and its input to one device"
            )
    if bias is not None:
        bias = bias if bias.dtype == x.dtype else bias.to(x.dtype)
        bias = bias.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # Intermediates are only kept (and consecutive cores only left unfused) when a backward can follow.
    keep = needs_autograd(x, cores, bias)
    y = _mpo_op(x2, cores, bias, keep)[0]
    return y.reshape(*lead, y.shape[-1])

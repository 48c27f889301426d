"""Functional ops: validate arguments, normalize conv parameters, and hand off to a backend."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._int_pair import int_pair
from ..plan.backends import auto_mpo_backend
from ..plan.cache import planned_rows
from .dispatch import BACKENDS, backend_available, check_backend, preload, resolve
from .modes import (
    autocast_dtype,
    needs_autograd,
    refuse_jit_script,
    refuse_jit_trace,
    run_in_autocast_dtype,
    under_transform_or_dual,
)
from .mpo.reference import check_mpo_cores, mpo_linear_reference, mpo_to_dense
from .mpo.torch_low_rank import is_low_rank_chain, low_rank_apply, low_rank_train
from .tucker.reference import check_tucker_factors, tucker_conv2d_reference, tucker_to_dense
from .tucker.torch_impl import run_route as run_tucker_route

__all__ = [
    "BACKENDS",
    "autocast_dtype",
    "backend_available",
    "check_backend",
    "preload",
    "needs_autograd",
    "refuse_jit_script",
    "under_transform_or_dual",
    "mpo_linear",
    "run_mpo_linear",
    "low_rank_route",
    "run_low_rank_route",
    "mpo_linear_reference",
    "mpo_to_dense",
    "tucker_conv2d",
    "tucker_conv2d_reference",
    "tucker_route",
    "run_tucker_route",
    "tucker_to_dense",
    "check_mpo_cores",
    "check_input_width",
    "check_input_dtype",
    "MIXED_DTYPE_BACKENDS",
    "conv_padding",
]

# Resolved at import, not inside the first call (which may be traced by torch.compile): see dispatch.preload.
preload("mpo_linear", "auto")
preload("tucker_conv2d", "auto")


def check_input_width(x: torch.Tensor, in_features: int, where: str, detail: str = "") -> None:
    """Raise ValueError unless x is [..., in_features]."""
    width = x.shape[-1] if x.dim() else 0
    if width != in_features:
        raise ValueError(
            f"{where}: input has {width} features in its last dimension but the cores expect {in_features}{detail}"
        )


# Backends that take an input in another dtype than the weights: the native kernel (fp32 input, bf16 cores) and
# the Triton kernels (which cast the parameters to the input's dtype)
MIXED_DTYPE_BACKENDS = ("native", "triton")


def check_bias_dtype(bias: torch.Tensor | None, weight: torch.Tensor, where: str) -> None:
    """A bias of another dtype than the weights: F.linear / F.conv2d refuse it, and the planned paths would either
    fail inside a backend or (with autograd) silently promote the output to the bias's dtype."""
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(
            f"{where}: bias is {bias.dtype} but the weights are {weight.dtype}; cast it (bias.to({weight.dtype}))"
        )


def check_input_dtype(x: torch.Tensor, weight: torch.Tensor, where: str, mixed_ok: bool = False) -> None:
    """Raise ValueError for an input the layer cannot multiply: not floating point, or (outside autocast, and
    unless the backend takes mixed dtypes: `mixed_ok`) of another dtype than the weights. Without it the error
    came from deep inside a backend ("expected m1 and m2 to have the same dtype", or the planner refusing to
    calibrate int64) and named neither the layer nor the fix."""
    if not x.is_floating_point():
        raise ValueError(f"{where}: input has dtype {x.dtype}; it must be floating point (x.float())")
    amp = autocast_dtype(x)  # autocast casts float32 operands only, as it does nn.Linear's

    def computed_in(t: torch.Tensor) -> torch.dtype:
        return amp if amp is not None and t.dtype == torch.float32 else t.dtype

    if computed_in(x) != computed_in(weight) and not mixed_ok:
        under = f" (under autocast to {amp}, which casts float32 operands only)" if amp is not None else ""
        raise ValueError(
            f"{where}: input is {x.dtype} but the weights are {weight.dtype}{under}; cast the input "
            f"(x.to({weight.dtype})) or the layer (.to({x.dtype}))"
            + ("" if amp is not None else ", or run under torch.autocast")
        )


def mpo_linear(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x @ W.T + bias where W[out, in] is the MPO given by `cores` (see docs/ARCHITECTURE.md).

    Args:
        x: [..., in_features], any leading dimensions.
        cores: G_k of shape (r_{k-1}, i_k, j_k, r_k), r_0 = r_N = 1, in_features = prod(i_k).
        bias: [out_features] or None.
        backend: "auto" | "torch" | "triton" | "native".

    Example:
        >>> cores = mpo_decompose(torch.randn(12, 8), (2, 4), (3, 4))
        >>> mpo_linear(torch.randn(5, 8), cores).shape
        torch.Size([5, 12])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mpo_linear: x must be a torch.Tensor [..., in_features], got {type(x).__name__}")
    cores = list(cores)
    check_mpo_cores(cores)
    in_features = 1
    out_features = 1
    for g in cores:
        in_features *= g.shape[1]
        out_features *= g.shape[2]
    check_input_width(x, in_features, "mpo_linear", f" (input modes {[g.shape[1] for g in cores]})")
    if bias is not None and getattr(bias, "shape", None) != (out_features,):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"mpo_linear: bias must be a tensor of shape ({out_features},), got {got}")
    check_input_dtype(x, cores[0], "mpo_linear", mixed_ok=backend in MIXED_DTYPE_BACKENDS)
    if backend not in MIXED_DTYPE_BACKENDS:
        check_bias_dtype(bias, cores[0], "mpo_linear")
    return run_mpo_linear(x, cores, bias, backend)


def run_mpo_linear(x: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None, backend: str):
    """mpo_linear after its argument checks, for a caller that has made them: MPOLinear checks its cores when it
    is built and the input's width on every call (at one row the checks cost a third of the call)."""
    refuse_jit_trace("mpo_linear")
    amp = autocast_dtype(x)
    if amp is not None:  # in autocast's dtype, autocast off inside (modes.run_in_autocast_dtype)
        return run_in_autocast_dtype(amp, lambda x, b, *g: run_mpo_linear(x, list(g), b, backend), [x, bias, *cores])
    if backend == "auto" and under_transform_or_dual():
        backend = "torch"  # its plain path (mpo_linear_torch): native kernels cannot run under torch.func
    if backend == "auto":
        needs_grad = needs_autograd(x, cores, bias)
        low_rank = len(cores) == 2 and is_low_rank_chain((cores[0].shape, cores[1].shape))
        rows = planned_rows(x.numel() // max(x.shape[-1], 1)) if x.dim() else 0
        backend = auto_mpo_backend(x.device.type, rows, x.dtype, needs_grad, low_rank)
        if backend == "native" and torch.compiler.is_compiling():
            backend = "torch"  # the C++ call is opaque to dynamo (and times routes on its first call)
    fn = resolve("mpo_linear", backend, x.device.type)
    return fn(x, cores, bias)


def low_rank_route(x: torch.Tensor, cores: list[torch.Tensor], backend: str, needs_grad: bool):
    """For a caller that repeats calls on inputs of one shape (MPOLinear's memo): how run_mpo_linear runs this
    (already validated) call when it takes the low-rank route, for `run_low_rank_route`; None for any other route.
    `needs_grad`: as run_mpo_linear computes it (grad mode on and x, a core or the bias requiring grad)."""
    if len(cores) != 2 or x.dim() == 0 or torch.compiler.is_compiling():
        return None
    if not is_low_rank_chain((cores[0].shape, cores[1].shape)):
        return None
    x2d = x.reshape(-1, x.shape[-1])
    if backend == "auto":
        backend = auto_mpo_backend(x.device.type, x2d.shape[0], x.dtype, needs_grad, True)
    if backend != "torch":
        return None
    from .mpo.torch_impl import low_rank_route as torch_low_rank_route

    return torch_low_rank_route(x2d, cores, needs_grad)


def run_low_rank_route(x: torch.Tensor, route: tuple, cores, bias: torch.Tensor | None) -> torch.Tensor:
    """The call `route` (from low_rank_route) stands for, on x of the shape it was made for."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if route[0] == "views":
        y = low_rank_apply(x2d, route[1], route[2], bias, route[3])
    else:
        y = low_rank_train(x2d, cores, bias, route[1], route[2])
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[1])


def tucker_route(
    x: torch.Tensor,
    u_in: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    *,
    needs_grad: bool,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    backend: str = "auto",
):
    """For a caller that repeats calls on inputs of one shape (TuckerConv2d's call memo): the route a tucker_conv2d
    call with these (already validated) arguments takes on the torch backend, no-grad or training as `needs_grad`
    says, for `run_tucker_route(x, route, u_in, core, u_out, bias)`; None for other backends and while compiling."""
    if backend not in ("auto", "torch") or torch.compiler.is_compiling():
        return None
    from .tucker.torch_impl import route

    stride_t, dilation_t = _pair(stride, "stride"), _pair(dilation, "dilation")
    padding_t = conv_padding(padding, (core.shape[2], core.shape[3]), dilation_t, stride_t)
    return route(x, u_in, core, u_out, (stride_t, padding_t, dilation_t), needs_grad)


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    return int_pair(v, name, "tucker_conv2d")


def conv_padding(
    padding: int | Sequence[int] | str,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    stride: tuple[int, int],
) -> tuple[int, int]:
    """Resolve 'same' / 'valid' / int / pair into explicit symmetric (pad_h, pad_w)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("tucker_conv2d: padding='same' needs stride 1 (as in torch.nn.Conv2d)")
            pads = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                if total % 2:
                    raise ValueError(
                        "tucker_conv2d: padding='same' with an even effective kernel size needs asymmetric "
                        "padding, which is not supported; pass explicit padding instead"
                    )
                pads.append(total // 2)
            return (pads[0], pads[1])
        raise ValueError(f"tucker_conv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    return _pair(padding, "padding")


def tucker_conv2d(
    x: torch.Tensor,
    u_in: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Tucker-2 convolution: equal to F.conv2d(x, einsum('or,rsyx,is->oiyx', u_out, core, u_in), bias, ...).

    Args:
        x: [N, C_in, H, W]. u_in: [C_in, R_in]. core: [R_out, R_in, kh, kw]. u_out: [C_out, R_out].
        bias: [C_out] or None. stride / padding / dilation as in torch.nn.functional.conv2d ('same' included).
    """
    if not all(isinstance(t, torch.Tensor) for t in (x, u_in, core, u_out)):
        raise TypeError("tucker_conv2d: x, u_in, core and u_out must be torch.Tensors")
    if x.dim() != 4:
        raise ValueError(f"tucker_conv2d: x must be [N, C_in, H, W], got shape {tuple(x.shape)}")
    check_tucker_factors(u_in, core, u_out, "tucker_conv2d")
    if x.shape[1] != u_in.shape[0]:
        raise ValueError(f"tucker_conv2d: input has {x.shape[1]} channels but u_in expects {u_in.shape[0]}")
    if bias is not None and getattr(bias, "shape", None) != (u_out.shape[0],):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"tucker_conv2d: bias must be a tensor of shape ({u_out.shape[0]},), got {got}")
    check_input_dtype(x, core, "tucker_conv2d", mixed_ok=backend == "triton")
    if backend != "triton":
        check_bias_dtype(bias, core, "tucker_conv2d")
    refuse_jit_trace("tucker_conv2d")
    stride_t = _pair(stride, "stride")
    dilation_t = _pair(dilation, "dilation")
    padding_t = conv_padding(padding, (core.shape[2], core.shape[3]), dilation_t, stride_t)
    if min(stride_t) < 1 or min(dilation_t) < 1 or min(padding_t) < 0:  # F.conv2d: a bare error or a division by 0
        raise ValueError(
            f"tucker_conv2d: stride and dilation must be >= 1 and padding >= 0, got stride={stride_t}, "
            f"padding={padding_t}, dilation={dilation_t}"
        )
    if not (u_in.dtype == core.dtype == u_out.dtype) and backend != "triton":
        raise ValueError(
            f"tucker_conv2d: u_in, core and u_out must share one dtype, got {u_in.dtype}, {core.dtype}, "
            f"{u_out.dtype}; cast them to one (.to(core.dtype))"
        )
    fn = resolve("tucker_conv2d", backend, x.device.type)
    amp = autocast_dtype(x)
    if amp is not None:  # in autocast's dtype, autocast off inside (modes.run_in_autocast_dtype)
        return run_in_autocast_dtype(
            amp, lambda *t: fn(*t, stride_t, padding_t, dilation_t), [x, u_in, core, u_out, bias]
        )
    return fn(x, u_in, core, u_out, bias, stride_t, padding_t, dilation_t)

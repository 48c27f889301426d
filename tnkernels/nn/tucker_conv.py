"""TuckerConv2d: a drop-in replacement for nn.Conv2d whose kernel is a Tucker-2 decomposition."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .._int_pair import int_pair, int_tuple
from ..decompose import (
    check_ratio,
    tucker_decompose,
    tucker_max_ranks,
    tucker_num_params,
    tucker_ranks_for_error,
    tucker_ranks_for_ratio,
)
from ..ops import check_backend, conv_padding, preload, run_tucker_route, tucker_conv2d, tucker_route, tucker_to_dense
from ..ops.modes import needs_autograd, refuse_jit_script
from ..ops.tucker.ranks import choose_tucker_ranks
from ..ops.tucker.tuned import kind_for, kind_is_timed
from ..plan import explain_tucker
from ..plan.cache import plan_generation
from .call_memo import MemoizedCalls, memo_applies
from .no_dense_weight import ExplainsMissingWeight

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _explicit_padding(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) for an nn.Conv2d padding, as nn.Conv2d pads for a non-zero padding_mode:
    'same' puts the odd pixel of an even total on the right/bottom."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for k, d in ((kernel_size[1], dilation[1]), (kernel_size[0], dilation[0])):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    return (padding[1], padding[1], padding[0], padding[0])


def _input_padding(padding, padding_mode, kernel_size, stride, dilation) -> tuple[int, int, int, int] | None:
    """What the layer pads its input with before a convolution that pads nothing (F.pad's order), or None when the
    convolution pads itself: every non-zero padding_mode, as nn.Conv2d does, and padding='same' whose effective
    kernel d (k - 1) + 1 is even (nn.Conv2d pads the odd pixel on the right/bottom, which a convolution's symmetric
    padding cannot: zeros then, with F.pad). 'same' with a stride is left to the convolution, which refuses it."""
    if padding_mode != "zeros":
        return _explicit_padding(padding, kernel_size, dilation)
    uneven = any(d * (k - 1) % 2 for k, d in zip(kernel_size, dilation, strict=True))
    if padding == "same" and uneven and tuple(stride) == (1, 1):
        return _explicit_padding(padding, kernel_size, dilation)
    return None


def _check_geometry(kernel_size, stride, padding, dilation) -> None:
    """What nn.Conv2d refuses when it is built (or F.conv2d at the first call, with a bare message)."""
    for name, pair, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("dilation", dilation, 1)):
        if min(pair) < least:
            raise ValueError(f"TuckerConv2d: {name} must be >= 1, got {pair}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"TuckerConv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if padding == "same" and tuple(stride) != (1, 1):
            raise ValueError(f"TuckerConv2d: padding='same' needs stride 1 (as in nn.Conv2d), got stride={stride}")
    elif min(padding) < 0:
        raise ValueError(f"TuckerConv2d: padding must be >= 0, got {padding}")


def _timed_conv(conv: nn.Conv2d) -> tuple:
    """(stride, padding, dilation) of `conv` as the rank timing runs it: 'same' with an even kernel pads
    asymmetrically, which the timing can do without (no padding)."""
    try:
        padding = conv_padding(conv.padding, conv.kernel_size, conv.dilation, conv.stride)
    except ValueError:
        padding = (0, 0)
    return (tuple(conv.stride), tuple(padding), tuple(conv.dilation))


class TuckerConv2d(MemoizedCalls, ExplainsMissingWeight, nn.Module):
    """Conv2d with W = einsum('or,rsyx,is->oiyx', u_out, core, u_in).

    Runs as: project C_in -> R_in channels (u_in), convolve R_in -> R_out with the kh x kw core (stride, padding,
    dilation), project R_out -> C_out (u_out), add the bias. Build one from a trained conv with `from_conv`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        ranks: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"TuckerConv2d: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        check_backend(backend, "TuckerConv2d", "tucker_conv2d")
        r_out, r_in = int_tuple(ranks, "ranks (R_out, R_in)", "TuckerConv2d", length=2)
        if not (1 <= r_out <= out_channels and 1 <= r_in <= in_channels):
            raise ValueError(
                f"TuckerConv2d: ranks ({r_out}, {r_in}) must be within 1..out_channels={out_channels} and "
                f"1..in_channels={in_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = int_pair(kernel_size, "kernel_size", "TuckerConv2d")
        self.stride = int_pair(stride, "stride", "TuckerConv2d")
        self.dilation = int_pair(dilation, "dilation", "TuckerConv2d")
        self.padding = padding if isinstance(padding, str) else int_pair(padding, "padding", "TuckerConv2d")
        _check_geometry(self.kernel_size, self.stride, self.padding, self.dilation)
        self.padding_mode = padding_mode
        # Non-zero padding modes (and 'same' with an even kernel) pad the input first (F.pad), then convolve without
        # padding, as nn.Conv2d does.
        self._pad = _input_padding(self.padding, padding_mode, self.kernel_size, self.stride, self.dilation)
        self.ranks = (r_out, r_in)
        self.backend = backend
        preload("tucker_conv2d", backend)  # now, not in a first call that torch.compile may be tracing
        factory = {"device": device, "dtype": dtype}
        self.u_in = nn.Parameter(torch.empty(in_channels, r_in, **factory))
        self.core = nn.Parameter(torch.empty(r_out, r_in, *self.kernel_size, **factory))
        self.u_out = nn.Parameter(torch.empty(out_channels, r_out, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Orthonormal factors (as HOSVD gives) and a core scaled so that W has nn.Conv2d's default variance.
        nn.init.orthogonal_(self.u_in)
        nn.init.orthogonal_(self.u_out)
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        # With orthonormal factors, ||W||_F = ||core||_F; match the dense kernel's expected energy.
        dense_energy = self.out_channels * fan_in / (3.0 * fan_in)
        std = math.sqrt(dense_energy / self.core.numel())
        nn.init.normal_(self.core, std=std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        ranks: Sequence[int] | None = None,
        ratio: float | None = None,
        rel_tol: float | None = None,
        n_iter: int = 0,
        backend: str = "auto",
        prefer: str | None = None,
    ) -> TuckerConv2d:
        """Decompose a trained nn.Conv2d (groups=1, any padding_mode). Give one of ranks, ratio or rel_tol; none
        keeps full ranks (exact): the ranks the kernel's unfoldings have (decompose.tucker_max_ranks), at most
        (min(C_out, C_in kh kw), min(C_in, C_out kh kw)), as are the ranks rel_tol picks. Explicit `ranks` may go
        up to the channel counts; past those bounds the factors are completed with orthonormal directions the kernel
        does not use (the result stays exact, and the extra ranks are there to train). `n_iter` adds HOOI
        refinement sweeps after the HOSVD.

        With `ratio`, prefer="accuracy" (the default) keeps the largest ranks proportional to the channel counts.
        prefer="speed" takes, on a CPU, the rank pair of about the same size and error (bound within 5%) whose
        convolutions run fastest on this machine, timed once per shape and kept (ops/tucker/ranks.py). It is
        opt-in because the ranks then depend on the machine (and on the first timing's noise), and a fresh cache
        adds the timing to the first conversion."""
        where = "TuckerConv2d.from_conv"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{where}: expected nn.Conv2d, got {type(conv).__name__}")
        check_backend(backend, where, "tucker_conv2d")  # before the decomposition, not after it
        if conv.groups != 1:
            raise ValueError(
                f"{where}: grouped/depthwise convolutions (groups={conv.groups}) are not supported by Tucker-2; "
                "leave this layer dense (exclude it in tensorize rules)"
            )
        chosen = [name for name, v in (("ranks", ranks), ("ratio", ratio), ("rel_tol", rel_tol)) if v is not None]
        if len(chosen) > 1:
            raise ValueError(f"{where}: give only one of ranks, ratio or rel_tol (got {', '.join(chosen)})")
        if prefer is not None and (prefer not in ("speed", "accuracy") or ratio is None):
            raise ValueError(f"{where}: prefer must be 'speed' or 'accuracy', with ratio=; got prefer={prefer!r}")
        weight = conv.weight
        if ratio is not None:
            check_ratio(ratio, f"{where}: ratio")
            if prefer == "speed":
                ranks = choose_tucker_ranks(weight, ratio, _timed_conv(conv), "speed")
            else:
                ranks = tucker_ranks_for_ratio(tuple(weight.shape), ratio)
        elif rel_tol is not None:
            ranks = tucker_ranks_for_error(weight, rel_tol)
        elif ranks is None:
            ranks = tucker_max_ranks(weight.shape)
        u_out, core, u_in = tucker_decompose(weight, ranks, n_iter=n_iter)  # checks ranks
        # skip_init: every parameter is overwritten below, so the random init would be wasted work.
        layer = skip_init(
            cls,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            ranks=tuple(ranks),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.u_out.copy_(u_out)
            layer.core.copy_(core)
            layer.u_in.copy_(u_in)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:  # a try costs nothing in Python 3.11 until it catches
            unbatched = x.dim() == 3
        except AttributeError:
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(x).__name__}") from None
        if unbatched:  # [C, H, W], as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self._pad is not None:
            x = F.pad(x, self._pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        p = self._parameters  # direct: each nn.Module attribute lookup of a parameter costs ~0.4 us
        if "u_in" in p and "core" in p and "u_out" in p:
            factors = (p["u_in"], p["core"], p["u_out"])
        else:  # a factor pruned or parametrized (torch.nn.utils) is no longer in the dict
            factors = (self.u_in, self.core, self.u_out)
        bias = p["bias"] if "bias" in p else self.bias  # not in the dict: None, or pruned / parametrized
        # outside torch.compile the memo may already know this call's route, no-grad or training
        memo = self._memo_for_calls if memo_applies(x) else None
        if memo is not None:
            needs_grad = needs_autograd(x, factors, bias)
            known, route = memo.get(x, factors, needs_grad)
            if route is not None:
                return run_tucker_route(x, route, *factors, bias)
        padding = self.padding if self._pad is None else 0
        conv = dict(stride=self.stride, padding=padding, dilation=self.dilation, backend=self.backend)
        y = tucker_conv2d(x, *factors, bias, **conv)  # validates the call
        if memo is not None and not known:  # after the call: one that raised is not remembered
            generation = plan_generation()  # before the route is derived (CallMemo.put)
            memo.put(x, factors, needs_grad, tucker_route(x, *factors, needs_grad=needs_grad, **conv), generation)
        return y

    dense_method = "to_conv"  # named in the error for code that reads .weight (no_dense_weight.py)

    def __prepare_scriptable__(self):  # torch.jit.script calls this first: a clear refusal, not a compile error
        refuse_jit_script(type(self).__name__)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "padding_mode" not in state:  # a whole layer pickled before padding modes existed (2026-12-02)
            self.padding_mode = "zeros"
        # also a layer pickled before 'same' with an even kernel padded its input (2026-12-02)
        self._pad = _input_padding(self.padding, self.padding_mode, self.kernel_size, self.stride, self.dilation)

    def explain(self, input_shape: Sequence[int], *, needs_grad: bool = False) -> str:
        """How a call on inputs of `input_shape` ([N, C_in, H, W]) runs: the cost model's plan with its steps and
        alternatives (tnkernels.plan.explain_tucker), then the kind that runs. On a CPU that is the fastest kind
        timed on the first call of the shape (ops/tucker/tuned.py), so this may time them now, as that call would."""
        n, c, h, w = int_tuple(input_shape, "input_shape [N, C_in, H, W]", "TuckerConv2d.explain", length=4, minimum=0)
        if c != self.in_channels:
            raise ValueError(f"TuckerConv2d.explain: input_shape has {c} channels, the layer takes {self.in_channels}")
        padding = conv_padding(self.padding, self.kernel_size, self.dilation, self.stride) if self._pad is None else 0
        if self._pad is not None:  # the input is padded first (_input_padding), the conv pads nothing
            left, right, top, bottom = self._pad
            h, w, padding = h + top + bottom, w + left + right, (0, 0)
        conv = (tuple(self.stride), tuple(padding), tuple(self.dilation))
        shapes = ((n, c, h, w), tuple(self.u_in.shape), tuple(self.core.shape), tuple(self.u_out.shape))
        core = self.core
        plan = explain_tucker(
            *shapes,
            stride=conv[0],
            padding=conv[1],
            dilation=conv[2],
            dtype=core.dtype,
            device=core.device,
            needs_grad=needs_grad,
        )
        if self.backend == "triton":
            return plan + "\nruns: the fused Triton kernel (the kinds above are the torch backend's)"
        kind = kind_for(shapes, conv, core.dtype, core.device, needs_grad)
        timed = " (timed on this CPU)" if kind_is_timed(core.device) else ""
        return plan + f"\nruns: {kind}{timed}"

    def to_dense(self) -> torch.Tensor:
        """The dense kernel W[C_out, C_in, kh, kw]."""
        return tucker_to_dense(self.u_out, self.core, self.u_in)

    def to_conv(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.core.device,
            dtype=self.core.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.to_dense())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    @property
    def num_weight_params(self) -> int:
        return tucker_num_params((self.out_channels, self.in_channels, *self.kernel_size), self.ranks)

    @property
    def compression_ratio(self) -> float:
        return self.out_channels * self.in_channels * math.prod(self.kernel_size) / self.num_weight_params

    def extra_repr(self) -> str:
        mode = f"padding_mode={self.padding_mode!r}, " if self.padding_mode != "zeros" else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, {mode}"
            f"ratio={self.compression_ratio:.2f}, bias={self.bias is not None}, backend={self.backend!r}"
        )

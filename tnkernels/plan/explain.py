"""Human-readable description of a plan: steps and shapes, FLOPs, bytes, predicted time, the alternatives."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._int_pair import check_index, int_pair
from .cache import OPTIONS, mpo_decision, tucker_decision
from .mpo import MPODecision


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:9.1f} us" if s < 1e-2 else f"{s * 1e3:9.2f} ms"


def _fmt_n(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_mpo(dec: MPODecision, top: int = 8) -> str:
    f = dec.forward
    lines = [
        f"MPO chain {[tuple(s) for s in dec.shapes]}, rows={dec.rows}",
        f"forward plan: {f.label}   FLOPs {_fmt_n(f.flops)}  bytes {_fmt_n(f.bytes)}  "
        f"predicted {_fmt_s(f.seconds)}"
        f"   (dense GEMM predicted {_fmt_s(dec.dense_seconds)})",
    ]
    for s in f.steps:
        lines.append(f"    {s.what:<70s} {_fmt_n(s.flops):>8s} FLOP {_fmt_n(s.bytes):>8s} B {_fmt_s(s.seconds)}")
    if dec.backward is not None:
        how = "reusing saved states" if dec.save_states else "recomputing states"
        lines.append(
            f"backward plan: {dec.backward.label} ({how}), predicted {_fmt_s(dec.bwd_seconds)}; "
            f"extra memory saved for backward: {_fmt_n(dec.saved_bytes)}B"
        )
    else:
        lines.append("backward plan: none (no gradient needed)")
    chain_vs_dense = f.seconds / dec.dense_seconds if dec.dense_seconds else float("inf")
    lines.append(
        f"cache_dense: the chain is predicted at {chain_vs_dense:.2f}x the dense GEMM; "
        "caching the dense weight "
        f"would cost {_fmt_n(dec.dense_bytes)}B"
        + (" (cache_dense is on and would apply)" if OPTIONS.cache_dense and chain_vs_dense > 1 else "")
    )
    lines.append(f"alternatives considered ({len(dec.alternatives)}), fastest first:")
    for label, sec in dec.alternatives[:top]:
        lines.append(f"    {label:<40s} {_fmt_s(sec)}")
    if len(dec.alternatives) > top:
        lines.append(f"    ... {len(dec.alternatives) - top} more")
    return "\n".join(lines)


def explain(
    cores: Sequence[torch.Tensor] | Sequence[tuple[int, int, int, int]],
    rows: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    needs_grad: bool = False,
    top: int = 8,
) -> str:
    """Return (and print nothing) the plan the torch backend runs for an MPO layer at `rows` rows.

    `cores` may be tensors, their shapes (r0, i, j, r1), or an MPOLinear. Example:
        >>> print(explain([(1, 40, 40, 16), (16, 40, 160, 1)], rows=64))
    """
    rows = check_index(rows, "rows", "explain")
    if isinstance(getattr(cores, "cores", None), torch.nn.ParameterList):  # an MPOLinear (duck-typed: the
        cores = list(cores.cores)  # type: ignore[union-attr]  # planner does not import the modules)
    if isinstance(getattr(cores, "core", None), torch.Tensor):  # a TuckerConv2d
        raise ValueError("explain: that is a Tucker conv layer; use layer.explain(input_shape) or explain_tucker")
    shapes = tuple(
        tuple(int(d) for d in (c.shape if isinstance(c, torch.Tensor) else c))
        for c in cores  # type: ignore
    )
    if not shapes or any(len(s) != 4 for s in shapes):
        raise ValueError("explain: pass MPO cores (or their shapes) of 4 dimensions (r0, i, j, r1)")
    _check_chain(shapes)
    if isinstance(cores[0], torch.Tensor):
        dtype, device = cores[0].dtype, cores[0].device
    return format_mpo(mpo_decision(shapes, rows, dtype, torch.device(device), needs_grad), top)  # type: ignore


def _check_chain(shapes: tuple[tuple[int, ...], ...]) -> None:
    """The shapes must form an MPO chain, as the layers' cores do (else a bare einsum or division error)."""
    if any(d < 1 for s in shapes for d in s):
        raise ValueError(f"explain: every core dimension must be >= 1, got shapes {list(shapes)}")
    for k in range(1, len(shapes)):
        if shapes[k - 1][3] != shapes[k][0]:
            raise ValueError(
                f"explain: bond mismatch between core {k - 1} (r_next={shapes[k - 1][3]}) and core {k} "
                f"(r_prev={shapes[k][0]}); pass the cores of one MPO"
            )
    if shapes[0][0] != 1 or shapes[-1][3] != 1:
        raise ValueError(f"explain: boundary bonds must be 1, got r_0={shapes[0][0]}, r_N={shapes[-1][3]}")


def _int_pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, str):
        raise ValueError(
            f"explain_tucker: {name} must be an int or a pair of ints (h, w), got {value!r}; for 'same'/'valid' "
            "padding use TuckerConv2d.explain(input_shape)"
        )
    return int_pair(value, name, "explain_tucker")


def explain_tucker(
    x_shape: tuple[int, int, int, int],
    u_in_shape: tuple[int, int],
    core_shape: tuple[int, int, int, int],
    u_out_shape: tuple[int, int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    needs_grad: bool = False,
) -> str:
    """The Tucker-2 conv plan for these shapes: the kind, its steps, and the alternatives.

    stride, padding and dilation are ints or (h, w) pairs, as in nn.Conv2d; for padding='same' or 'valid' use
    layer.explain(input_shape) on a TuckerConv2d, which resolves them."""
    shapes = (tuple(x_shape), tuple(u_in_shape), tuple(core_shape), tuple(u_out_shape))
    geometry = (_int_pair(stride, "stride"), _int_pair(padding, "padding"), _int_pair(dilation, "dilation"))
    dec = tucker_decision(shapes, geometry, dtype, torch.device(device), needs_grad)
    lines = [
        f"Tucker-2 conv x{tuple(x_shape)} U_in{tuple(u_in_shape)} core{tuple(core_shape)} U_out{tuple(u_out_shape)}",
        f"plan: {dec.kind}   FLOPs {_fmt_n(dec.flops)}  bytes {_fmt_n(dec.bytes)}  predicted fwd "
        f"{_fmt_s(dec.fwd_seconds)} bwd {_fmt_s(dec.bwd_seconds)}  (dense conv {_fmt_s(dec.dense_seconds)})",
    ]
    for s in dec.steps:
        lines.append(f"    {s.what:<60s} {_fmt_n(s.flops):>8s} FLOP {_fmt_n(s.bytes):>8s} B {_fmt_s(s.seconds)}")
    lines.append("alternatives (forward time):")
    for label, sec in dec.alternatives:
        lines.append(f"    {label:<20s} {_fmt_s(sec)}")
    return "\n".join(lines)

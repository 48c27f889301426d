"""Plain-torch Tucker-2 convolution reference: project channels in, convolve with the core, project out."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_tucker_factors(u_in: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor, where: str) -> None:
    """ValueError unless u_in [C_in, R_in], core [R_out, R_in, kh, kw] and u_out [C_out, R_out] fit together."""
    if core.dim() != 4 or u_in.dim() != 2 or u_out.dim() != 2:
        raise ValueError(
            f"{where}: expected u_in [C_in, R_in], core [R_out, R_in, kh, kw], u_out [C_out, R_out], got shapes "
            f"{tuple(u_in.shape)}, {tuple(core.shape)}, {tuple(u_out.shape)}"
        )
    if u_in.shape[1] != core.shape[1] or u_out.shape[1] != core.shape[0]:
        raise ValueError(
            f"{where}: ranks disagree: u_in {tuple(u_in.shape)}, core {tuple(core.shape)}, u_out {tuple(u_out.shape)}"
        )


def tucker_to_dense(u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """W[C_out, C_in, kh, kw] = einsum('or,rsyx,is->oiyx', U_out, core, U_in)."""
    check_tucker_factors(u_in, core, u_out, "tucker_to_dense")
    return torch.einsum("or,rsyx,is->oiyx", u_out, core, u_in)


def tucker_conv2d_reference(
    x: torch.Tensor,
    u_in: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """Three convolutions: 1x1 (C_in -> R_in), kh x kw core (R_in -> R_out), 1x1 (R_out -> C_out) plus bias.

    Equal to F.conv2d(x, tucker_to_dense(u_out, core, u_in), bias, stride, padding, dilation) because the 1x1
    projections commute with zero padding (a projected zero is zero).
    """
    h = F.conv2d(x, u_in.t()[:, :, None, None])
    h = F.conv2d(h, core, None, stride, padding, dilation)
    return F.conv2d(h, u_out[:, :, None, None], bias)

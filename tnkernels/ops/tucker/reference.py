"""Plain-torch Tucker-2 convolution reference: project channels in, convolve with the core, project out."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tucker_to_dense(u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """W[C_out, C_in, kh, kw] = einsum('or,rsyx,is->oiyx', U_out, core, U_in)."""
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

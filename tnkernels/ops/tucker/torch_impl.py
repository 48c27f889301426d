"""Torch backend for the Tucker-2 convolution (plain torch ops; autograd through them)."""

from __future__ import annotations

import torch

from .reference import tucker_conv2d_reference


def is_available() -> tuple[bool, str]:
    return True, ""


def tucker_conv2d_torch(
    x: torch.Tensor,
    u_in: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    return tucker_conv2d_reference(x, u_in, core, u_out, bias, stride, padding, dilation)

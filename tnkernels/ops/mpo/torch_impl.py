"""Torch backend for the MPO chain. The planner issue replaces the body with planned contractions."""

from __future__ import annotations

import torch

from .reference import mpo_linear_reference


def is_available() -> tuple[bool, str]:
    return True, ""


def mpo_linear_torch(x: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    return mpo_linear_reference(x, cores, bias)

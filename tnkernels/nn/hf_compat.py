"""Recognizing Hugging Face GPT-2's Conv1D without importing transformers.

Conv1D is a linear layer whose weight is stored transposed, [in_features, out_features], with `nf` = out_features.
"""

from __future__ import annotations

import torch
from torch import nn


def is_hf_conv1d(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
        and module.weight.shape[1] == module.nf
    )


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or a Conv1D in nn.Linear layout [out_features, in_features]."""
    if is_hf_conv1d(module):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"expected nn.Linear or transformers' Conv1D, got {type(module).__name__}")

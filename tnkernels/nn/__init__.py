"""Drop-in tensorized layers. They hold parameters and call tnkernels.ops; no math of their own."""

from .hf_compat import is_hf_conv1d, linear_weight
from .mpo_linear import MPOLinear
from .tucker_conv import TuckerConv2d

__all__ = ["MPOLinear", "TuckerConv2d", "is_hf_conv1d", "linear_weight"]

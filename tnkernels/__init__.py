"""tnkernels: tensor-network layers (MPO, Tucker-2) that make networks smaller and faster.

Layers: decompose -> plan -> ops -> nn -> convert (see docs/ARCHITECTURE.md).
"""

from . import plan
from ._version import __version__
from .convert import LayerReport, TensorizeReport, count_params, load_compressed, save_compressed, tensorize
from .decompose import (
    RatioUnreachableError,
    auto_modes,
    mpo_bonds_for_ratio,
    mpo_decompose,
    mpo_num_params,
    tucker_decompose,
    tucker_num_params,
    tucker_ranks_for_error,
    tucker_ranks_for_ratio,
)
from .nn import MPOLinear, TuckerConv2d
from .ops import (
    backend_available,
    mpo_linear,
    mpo_linear_reference,
    mpo_to_dense,
    tucker_conv2d,
    tucker_to_dense,
)
from .ops.mpo.native_impl import native_available
from .plan import explain

__all__ = [
    "__version__",
    "LayerReport",
    "MPOLinear",
    "RatioUnreachableError",
    "TensorizeReport",
    "TuckerConv2d",
    "auto_modes",
    "backend_available",
    "count_params",
    "explain",
    "plan",
    "load_compressed",
    "mpo_bonds_for_ratio",
    "mpo_decompose",
    "mpo_linear",
    "mpo_linear_reference",
    "mpo_num_params",
    "mpo_to_dense",
    "native_available",
    "save_compressed",
    "tensorize",
    "tucker_conv2d",
    "tucker_decompose",
    "tucker_num_params",
    "tucker_ranks_for_error",
    "tucker_ranks_for_ratio",
    "tucker_to_dense",
]

"""Model-level conversion: tensorize(), its report, and compressed checkpoints."""

from .io import load_compressed, read_spec, save_compressed
from .report import LayerReport, TensorizeReport
from .tensorize import count_params, tensorize

__all__ = [
    "LayerReport",
    "TensorizeReport",
    "count_params",
    "load_compressed",
    "read_spec",
    "save_compressed",
    "tensorize",
]

"""Model-level conversion: tensorize(), its report, and compressed checkpoints."""

from .hf_save import guard_save_pretrained
from .io import load_compressed, read_spec, save_compressed
from .report import LayerReport, TensorizeReport
from .tensorize import count_params, tensorize

__all__ = [
    "LayerReport",
    "TensorizeReport",
    "count_params",
    "guard_save_pretrained",
    "load_compressed",
    "read_spec",
    "save_compressed",
    "tensorize",
]

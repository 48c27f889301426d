"""Slice-wise feature distillation (Hamreras, Singh, Orús 2026) on top of the public tnkernels API.

Cut a pretrained net into slices, tensorize each slice from an SVD-based decomposition, and train each slice alone
with MSE to reproduce the teacher's slice output from the teacher's slice input. See docs/distill.md.
"""

from .slices import PRESETS, SliceSpec, make_slices, resnet_slices, run_slice, slices_from_names

__all__ = ["PRESETS", "SliceSpec", "make_slices", "resnet_slices", "run_slice", "slices_from_names", "distill"]


def distill(*args, **kwargs):
    """Lazy alias of distill.runner.distill (keeps `import distill` light)."""
    from .runner import distill as _distill

    return _distill(*args, **kwargs)

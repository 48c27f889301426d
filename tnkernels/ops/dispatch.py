"""Backend selection for the functional ops.

Backend modules are imported lazily: a backend that is missing (no GPU, extension not built) only fails when it is
asked for, with a message that says why and what to do.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

BACKENDS = ("auto", "torch", "triton", "native")

# (op, backend) -> (module path, entry function name)
_REGISTRY: dict[tuple[str, str], tuple[str, str]] = {
    ("mpo_linear", "torch"): ("tnkernels.ops.mpo.torch_impl", "mpo_linear_torch"),
    ("mpo_linear", "triton"): ("tnkernels.ops.mpo.triton_impl", "mpo_linear_triton"),
    ("mpo_linear", "native"): ("tnkernels.ops.mpo.native_impl", "mpo_linear_native"),
    ("tucker_conv2d", "torch"): ("tnkernels.ops.tucker.torch_impl", "tucker_conv2d_torch"),
    ("tucker_conv2d", "triton"): ("tnkernels.ops.tucker.triton_impl", "tucker_conv2d_triton"),
}

_HINTS = {
    "triton": "the Triton backend needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)",
    "native": "the native backend needs the csrc/ extension: reinstall without TNK_NO_NATIVE=1 and with a C++ compiler",
}


# Resolved backends with their availability, cached: torch.compile cannot trace importlib.import_module (a graph
# break per op call), and availability (an import, a build) does not change while the process runs, so checking it
# on every call only cost time (~25 us per call at one row).
_LOADED: dict[tuple[str, str], tuple[Callable, tuple[bool, str]]] = {}


def _load(op: str, backend: str):
    cached = _LOADED.get((op, backend))
    if cached is not None:
        return cached
    if (op, backend) not in _REGISTRY:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op; use 'torch' or 'auto'")
    module_path, entry = _REGISTRY[(op, backend)]
    try:
        module = importlib.import_module(module_path)
    except ImportError as exc:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable ({exc}); {_HINTS.get(backend, '')}") from exc
    _LOADED[(op, backend)] = (getattr(module, entry), module.is_available())
    return _LOADED[(op, backend)]


def preload(op: str, backend: str) -> None:
    """Load `backend` for `op` now (for "auto": every backend it may pick), so that a first call made under
    torch.compile finds it loaded: dynamo cannot trace importlib and would break the graph there. A backend that is
    unavailable is skipped here; asking for it still raises, with the reason, at the call."""
    names = [backend]
    if backend == "auto":
        names = ["torch", "native"] + (["triton"] if os.environ.get("TNK_AUTO_TRITON") == "1" else [])
    for name in names:
        if (op, name) in _REGISTRY:
            try:
                _load(op, name)
            except (RuntimeError, ValueError):
                pass


def check_backend(backend, where: str, op: str | None = None) -> None:
    """Refuse an unknown backend name, or one `op` does not have, when a layer is built, not at its first call."""
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if op is not None and backend != "auto" and (op, backend) not in _REGISTRY:
        have = ["auto", *(b for o, b in _REGISTRY if o == op)]
        raise ValueError(f"{where}: {op} has no {backend!r} backend; use one of {', '.join(map(repr, have))}")


def backend_available(op: str, backend: str) -> tuple[bool, str]:
    """Whether `backend` can run `op` here, and if not, why."""
    try:
        _, available = _load(op, backend)
    except (RuntimeError, ValueError) as exc:
        return False, str(exc)
    return available


def resolve(op: str, backend: str, device_type: str) -> Callable:
    """Return the entry function for `op` on `backend`; 'auto' picks the best available for the device."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "torch"
    fn, (ok, why) = _load(op, backend)
    if not ok:
        raise RuntimeError(
            f"{op}: backend {backend!r} is unavailable on {device_type}: {why}. {_HINTS.get(backend, '')}"
        )
    return fn

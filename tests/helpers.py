"""Small helpers shared by tests: dtype tolerances and a scale-free error measure."""

from __future__ import annotations

import torch

# Relative-RMS tolerances keyed by (dtype, backend). The absolute floor of allclose-style checks does not fit
# contractions whose magnitude depends on bond dimension, so tests compare rel_rms(actual, expected) instead.
_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
_BACKEND_SLACK = {"torch": 1.0, "triton": 10.0, "native": 10.0}


def tolerance(dtype: torch.dtype, backend: str = "torch") -> float:
    return _TOL[dtype] * _BACKEND_SLACK.get(backend, 1.0)


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64; NaN/Inf anywhere gives inf."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "tensor") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_rms(actual, expected)
    if err > tol:
        a = actual.detach().to(torch.float64)
        e = expected.detach().to(torch.float64)
        bad = ((a - e).abs() > tol * e.abs().max().clamp_min(1e-30)) | ~torch.isfinite(a)
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: relative RMS error {err:.3e} > {tol:.1e}; first bad indices {idx}")


class ExtCalls:
    """Records the calls `module` makes through its `_ext` (the native extension): arguments by function name.
    Calls made from inside C++ (the low-rank Function's kernels) are not seen, only those from Python."""

    def __init__(self, monkeypatch, module) -> None:
        real = module._ext
        self.args: dict[str, list[tuple]] = {}
        record = self.args

        class Recording:
            def __getattr__(self, name):
                fn = getattr(real, name)

                def wrapped(*args):
                    record.setdefault(name, []).append(args)
                    return fn(*args)

                return wrapped

        monkeypatch.setattr(module, "_ext", Recording())

    def count(self, *names: str):
        """How many calls of `names` (one name: an int; several: a tuple)."""
        counts = tuple(len(self.args.get(n, ())) for n in names)
        return counts[0] if len(names) == 1 else counts

    def flags(self, name: str) -> list[int]:
        """The last argument (the flags) of every call of `name`."""
        return [args[-1] for args in self.args.get(name, ())]

"""A CPU-only stand-in for ``--device cuda``: checks which *modules* the code puts on the GPU, without a GPU.

No session of this project has had a GPU, so the device discipline of the distill code is checked here by
simulation. Under :func:`fake_cuda`:

* ``Module.to("cuda" | "cuda:N" | torch.device("cuda", N))`` and ``Module.cuda()`` leave the weights where they
  are (on the CPU) and tag the module and every submodule as being on the GPU; ``Module.cpu()`` and
  ``Module.to("cpu")`` tag them as on the CPU. The tag is a plain attribute, so ``copy.deepcopy`` and pickling
  (``torch.save`` / ``torch.load`` of a module) carry it, exactly as they carry a real module's device.
* ``Tensor.to(<cuda>)`` / ``Tensor.cuda()`` keep the data on the CPU (a dtype change still happens).
* ``torch.load(map_location=<cuda>)`` loads on the CPU and tags the modules it returns as on the GPU.
* a global forward pre-hook records every module *with its own parameters* that runs while not tagged as on
  the GPU: on a real GPU that call would have mixed a CPU module with GPU inputs (a RuntimeError), or silently
  run a step on the CPU.

What it cannot see: a *tensor* left on the CPU (the data never really moves, and results of ops carry no tag),
and code that places things with ``t.device`` (which is the real, CPU, device here). Those are checked by
reading the code and by the targeted tests next to the ones that use this harness.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

TAG = "_fake_device_type"


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _tag(module: nn.Module, where: str) -> None:
    for m in module.modules():
        m.__dict__[TAG] = where


def _tag_loaded(obj, where: str) -> None:
    if isinstance(obj, nn.Module):
        _tag(obj, where)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tag_loaded(v, where)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tag_loaded(v, where)


class FakeCuda:
    """What the run did: ``off_gpu`` lists (module class, tag) of every parameterized module that ran off the GPU."""

    def __init__(self) -> None:
        self.off_gpu: list[tuple[str, str | None]] = []
        self.set_device: list = []

    def _hook(self, module: nn.Module, args) -> None:
        if module._parameters and module.__dict__.get(TAG) != "cuda":
            self.off_gpu.append((type(module).__name__, module.__dict__.get(TAG)))


@contextlib.contextmanager
def fake_cuda(monkeypatch, *, available: bool = False, count: int = 1) -> Iterator[FakeCuda]:
    """Install the simulation (see the module doc). ``available=True`` also makes ``torch.cuda.is_available()``
    say yes with ``count`` devices (only for code that checks before it runs; tnkernels' own backend choice
    must not see it, so leave it off around training)."""
    rec = FakeCuda()
    mod_to, mod_cpu, t_to, load = nn.Module.to, nn.Module.cpu, torch.Tensor.to, torch.load

    def module_to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not _is_cuda(device):
            if device is not None:
                _tag(self, device.type)
            return mod_to(self, *args, **kwargs)
        _tag(self, "cuda")
        return mod_to(self, dtype) if dtype is not None else self

    def module_cuda(self, device=None):
        _tag(self, "cuda")
        return self

    def module_cpu(self):
        _tag(self, "cpu")
        return mod_cpu(self)

    def tensor_to(self, *args, **kwargs):
        copy = kwargs.pop("copy", False)
        try:
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        except (TypeError, RuntimeError):
            return t_to(self, *args, copy=copy, **kwargs)
        if not _is_cuda(device):
            return t_to(self, *args, copy=copy, **kwargs)
        return t_to(self, dtype=dtype or self.dtype, copy=copy)

    def tensor_cuda(self, device=None, non_blocking=False, memory_format=None):
        return self

    def torch_load(*args, **kwargs):
        where = kwargs.get("map_location")
        if isinstance(where, (str, torch.device)) and _is_cuda(where):
            kwargs["map_location"] = "cpu"
            obj = load(*args, **kwargs)
            _tag_loaded(obj, "cuda")
            return obj
        return load(*args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", module_to)
    monkeypatch.setattr(nn.Module, "cuda", module_cuda)
    monkeypatch.setattr(nn.Module, "cpu", module_cpu)
    monkeypatch.setattr(torch.Tensor, "to", tensor_to)
    monkeypatch.setattr(torch.Tensor, "cuda", tensor_cuda)
    monkeypatch.setattr(torch, "load", torch_load)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: rec.set_device.append(d))
    if available:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(rec._hook)
    try:
        yield rec
    finally:
        handle.remove()

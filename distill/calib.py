"""The calibration loader's contract with distill(): the same batches in the same order on every pass.

A run reads the loader once to capture the teacher's features and, in sequential mode, again for each slice whose
inputs are not carried from the slice upstream (the student's inputs must be paired with the teacher's targets of
the same samples). `CalibReader` digests every batch of its first pass (shapes, dtypes and a strided sample of the
values) and checks later passes against it, so a loader that reshuffles is refused instead of silently pairing
inputs with the wrong targets; the digest of the whole pass also enters the run's fingerprint, so a rerun in the
same output folder with other calibration data does not reuse the slices of the first run.

`training_flags` saves and restores every module's training flag (distill() runs the caller's model in eval mode
and hands it back as it was).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["CalibReader", "batch_digest", "check_calib_loader", "training_flags"]

_SAMPLE = 4096  # values hashed per tensor (evenly strided); all of them for smaller tensors
SAME_ORDER = "calib_loader must yield the same batches in the same order every pass: use shuffle=False"


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        flat = t.reshape(-1)
        if flat.numel() > _SAMPLE:
            flat = flat[:: -(-flat.numel() // _SAMPLE)]
        h.update(f"T{tuple(t.shape)}{t.dtype}|".encode())
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(f"{k!s}:".encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (tuple, list)):
        h.update(b"(")
        for o in obj:
            _feed(h, o)
        h.update(b")")
    elif isinstance(obj, (bool, int, float, str, bytes, type(None))):
        h.update(repr(obj).encode())
    else:
        h.update(type(obj).__qualname__.encode())


def batch_digest(batch) -> str:
    """A cheap digest of one batch: structure, shapes, dtypes and a strided sample of every tensor's values."""
    h = hashlib.sha1()
    _feed(h, batch)
    return h.hexdigest()


def _shuffles(loader) -> bool:
    from torch.utils.data import DataLoader, RandomSampler

    if not isinstance(loader, DataLoader):
        return False
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    return any(isinstance(s, RandomSampler) for s in samplers)


def check_calib_loader(loader, *, mode: str, n_slices: int) -> None:
    """Refuse up front a loader that reshuffles (a DataLoader with shuffle=True), and in sequential mode with
    several slices a one-shot iterator (a generator, iter(list)), which sequential mode may need to read again.
    Also, before the teacher runs, a loader that is not iterable, or one that is empty (a list of no batches)."""
    if not isinstance(loader, Iterable):
        raise TypeError(
            "calib_loader: must be an iterable of batches (a list of tensors or a DataLoader), got "
            f"{type(loader).__name__}"
        )
    if isinstance(loader, (list, tuple)) and not loader:
        raise ValueError("calib_loader: has no batches; pass at least one calibration batch")
    if _shuffles(loader):
        raise ValueError(f"{SAME_ORDER} (this DataLoader has a RandomSampler, so every pass reshuffles)")
    if mode == "sequential" and n_slices > 1 and iter(loader) is loader:
        raise ValueError(
            f"calib_loader: a one-shot iterator ({type(loader).__name__}) can be read only once, and sequential mode "
            f"reads it again for every slice whose inputs are not the upstream slice's outputs; pass something "
            f"re-iterable: a list of batches or a DataLoader (or use mode='parallel', which reads it once)"
        )


class CalibReader:
    """Passes over the calibration loader: the first records a digest per batch, later ones must match it."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.digests: list[str] | None = None

    def passes(self, what: str = "a pass") -> Iterator:
        """Iterate the loader once; the first pass records, later ones are checked batch by batch."""
        ref, seen = self.digests, []
        for i, batch in enumerate(self.loader):
            d = batch_digest(batch)
            if ref is not None and (i >= len(ref) or ref[i] != d):
                why = "more batches than" if i >= len(ref) else f"a different batch {i} than"
                raise ValueError(f"{SAME_ORDER}; {what} got {why} the first pass")
            seen.append(d)
            yield batch
        if ref is None:
            self.digests = seen
        elif len(seen) != len(ref):
            raise ValueError(f"{SAME_ORDER}; {what} got {len(seen)} batches, the first pass {len(ref)}")

    def digest(self) -> str:
        """The digest of the calibration data (reads the loader once, without a model, if no pass was made)."""
        if self.digests is None:
            for _ in self.passes():
                pass
        h = hashlib.sha1()
        for d in self.digests or []:
            h.update(d.encode())
        return h.hexdigest()[:16]


@contextlib.contextmanager
def training_flags(model: nn.Module):
    """Put `model` in eval mode for the block and give every module its own training flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, f in flags:
            m.training = f

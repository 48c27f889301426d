"""Sequential mode: slices train in model order, each on the inputs the already-trained student produces upstream.

Where slices follow each other directly (the teacher's output of one is the next one's input), the student's
inputs are carried from slice to slice by running only the trained upstream slice; otherwise (e.g. per-conv
slices with a BN/ReLU in between) the hybrid model (trained slices so far + teacher elsewhere) is run again over
the calibration loader, whose batches are checked against the teacher pass (distill.calib.CalibReader).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .capture import FeatureStore, _to, capture_features
from .slices import set_submodule

__all__ = ["run_sequential"]


def _chains(upstream: FeatureStore, store: FeatureStore) -> bool:
    """Whether the teacher fed `upstream`'s slice output straight into the next slice (e.g. consecutive ResNet
    blocks): then the student's input to the next slice is the trained upstream slice applied to its own input,
    and no pass of the whole model is needed."""
    if upstream.num_chunks != store.num_chunks:
        return False
    return all(
        y is not None and y.shape == x.shape and torch.equal(y, x)
        for (_, y, _), (x, _, _) in zip(upstream.chunks(), store.chunks(), strict=True)
    )


@torch.no_grad()
def _chained_store(modules, upstream: FeatureStore, targets: FeatureStore, root, budget, fp16, device) -> FeatureStore:
    """The next slice's store: inputs = the trained upstream slice run on its own (student) inputs; outputs and
    kwargs = the teacher's. The slice runs on `device`; stored features are on the CPU (FeatureStore.add)."""
    from .slices import run_slice

    store = FeatureStore(root, budget, fp16)
    for (x, _, kw), (_, y, tkw) in zip(upstream.chunks(), targets.chunks(), strict=True):
        store.add(run_slice(modules, x.float().to(device), _to(kw, device)), y, tkw)
    return store


def run_sequential(
    teacher,
    specs,
    train_names: set[str],
    targets: dict[str, FeatureStore],
    done: dict[str, dict],
    reader,
    train: Callable,
    *,
    device,
    fp16: bool,
    feat_root,
    budget,
    forward_fn,
    progress: bool,
) -> list[str]:
    """Train the slices named in `train_names` in model order (`train(spec, store)` trains and checkpoints one);
    `targets` holds the teacher's features of every slice. Returns the slices whose inputs were carried."""
    from tqdm.auto import tqdm

    hybrid = copy.deepcopy(teacher).eval()
    store, upstream = None, None  # the current slice's student-input store; the previous slice's (spec, store)
    chained: list[str] = []
    for spec in tqdm(specs, desc="slices (sequential)", disable=not progress, unit="slice"):
        seq_root = None if feat_root is None else feat_root / f"{spec.name}.seq"
        store = None
        if upstream is not None and upstream[1] is not None and _chains(targets[upstream[0].name], targets[spec.name]):
            mods = [hybrid.get_submodule(n) for n in upstream[0].modules]
            store = _chained_store(mods, upstream[1], targets[spec.name], seq_root, budget, fp16, device)
            chained.append(spec.name)
        elif upstream is None:  # the first slice: nothing upstream is trained, its inputs are the teacher's
            store = targets[spec.name]
        elif spec.name in train_names:
            batches = reader.passes(f"the pass for slice {spec.name!r} (sequential mode)")
            inputs = capture_features(
                hybrid, [spec], batches, device=device, forward_fn=forward_fn, outputs=False, progress=False
            )[spec.name]
            store = FeatureStore(seq_root, budget, fp16)
            for (x, _, kw), (_, y, _) in zip(inputs.chunks(), targets[spec.name].chunks(), strict=True):
                store.add(x, y, kw)
        if upstream is not None:
            targets[upstream[0].name].clear()  # no longer needed: free memory (or shards) as we go
            if upstream[1] is not None:
                upstream[1].clear()
        if spec.name in train_names:
            train(spec, store)
        payload = done.get(spec.name)
        if payload is not None:
            for name, module in payload["modules"].items():
                # on the teacher's device: checkpoints are read on the CPU, and a CUDA hybrid with CPU slices
                # failed in the next pass over it (and ran the chained slices on the CPU)
                set_submodule(hybrid, name, copy.deepcopy(module).to(device))
        hybrid.eval()
        upstream = (spec, store)
    if store is not None:
        store.clear()
    targets[specs[-1].name].clear()
    return chained

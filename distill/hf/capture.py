"""Layer-by-layer teacher capture for Hugging Face models, with activations on disk and bounded memory.

One full teacher pass with hooks on every slice would hold every slice's features at once. Instead the teacher
is run *block by block*: the embeddings' output (block 0's input) is written to disk per calibration batch,
then each block reads its input batch from disk, runs, and writes its output as the next block's input. Hooks
on the slice modules inside the running block write the slice's input / output (and the keyword arguments of
its first module: attention mask, position ids) to ``<store>/<slice>/``. Resident memory is the model plus one
batch of one block's activations, whatever the number of blocks or slices; disk holds two boundary activations
per batch plus the features of the slices asked for.

Store layout::

    <store>/_tokens/<b>.pt        {"token_mask": [B, T] bool}   which positions are real tokens (loss masking)
    <store>/<slice>/x<b>.pt       {"x": [B, T, d_in], "kwargs": {...}}
    <store>/<slice>/y<b>.pt       {"y": [B, T, d_out]}
    <store>/<slice>/DONE          written last: the slice's features are complete (a killed capture is redone)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from distill._atomic import atomic_save
from distill.slices import SliceSpec

from .models import base_model, block_names
from .presets import bind_call


class _StopForward(Exception):
    """Raised by the block-0 pre-hook: everything after block 0's input is not needed."""


def _to_store(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.cpu().contiguous()


def _store_kwargs(kwargs: dict) -> dict:
    # Masks and position ids are stored as they are: an fp16 mask would turn large negatives into -inf.
    return {
        k: (tuple(v.detach().cpu() for v in val) if isinstance(val, tuple) else val.detach().cpu())
        for k, val in kwargs.items()
    }


def _owning_block(name: str, blocks: Sequence[str]) -> int:
    for i, b in enumerate(blocks):
        if name == b or name.startswith(b + "."):
            return i
    raise ValueError(
        f"slice module {name!r} is not inside a transformer block ({blocks[0]} ... {blocks[-1]}); "
        "only block-level and sub-block modules can be slices"
    )


def slice_done(store: Path, name: str) -> bool:
    return (Path(store) / name / "DONE").is_file()


@torch.no_grad()
def capture_features(
    model: nn.Module,
    specs: Sequence[SliceSpec],
    calib: Iterable[dict[str, torch.Tensor]],
    store: str | os.PathLike,
    *,
    store_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
) -> dict:
    """Fill ``store`` with the teacher features of ``specs``, block by block (see the module docstring).

    ``calib``: model-call dicts (``input_ids`` and optionally ``attention_mask``).
    ``store_dtype=torch.float16`` halves the disk and I/O. Slices whose features are already complete are
    skipped, and blocks after the last needed one are never run. ``on_block(i)`` is called after block ``i``
    has processed every batch. Returns ``{"batches", "blocks_run", "bytes_written"}``.
    """
    from tqdm.auto import tqdm

    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    base = base_model(model)
    device = torch.device(device) if device is not None else next(base.parameters()).device
    blocks = block_names(base)
    todo = [s for s in specs if not slice_done(store, s.name)]
    if not todo:
        return {"batches": 0, "blocks_run": 0, "bytes_written": 0}
    first_block = {s.name: _owning_block(s.modules[0], blocks) for s in todo}
    last_block = {s.name: _owning_block(s.modules[-1], blocks) for s in todo}
    n_blocks = max(last_block.values()) + 1
    written = 0

    def save(obj, path: Path) -> None:
        nonlocal written
        atomic_save(obj, path)
        written += path.stat().st_size

    # Stage 0: block 0's input and keyword arguments for every batch, by running the base model up to block 0.
    bdir = store / "_boundary"
    tdir = store / "_tokens"
    for d in (bdir, tdir):
        d.mkdir(exist_ok=True)
    block0 = base.get_submodule(blocks[0])
    seen: dict = {}

    def grab(module, args, kwargs):
        seen["x"], seen["kwargs"] = bind_call(module, args, kwargs)
        raise _StopForward

    handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
    n_batches = 0
    try:
        for b, batch in enumerate(tqdm(list(calib), desc="capture: embeddings", disable=not progress)):
            batch = {k: v.to(device) for k, v in batch.items()}
            try:
                base(**batch, use_cache=False) if _accepts_use_cache(base) else base(**batch)
            except _StopForward:
                pass
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            save({"token_mask": mask.bool().cpu()}, tdir / f"{b}.pt")
            save({"h": _to_store(seen["x"], None), "kwargs": _store_kwargs(seen["kwargs"])}, bdir / f"in{b}.pt")
            n_batches += 1
    finally:
        handle.remove()

    # Stage 1..n: block by block, every batch; hooks write the features of the slices living in this block.
    for name in {s.name for s in todo}:
        d = store / name
        if d.exists():
            shutil.rmtree(d)  # incomplete features from a killed run
        d.mkdir()
    current = {"b": 0}
    for i in range(n_blocks):
        handles = []
        for s in todo:
            if first_block[s.name] == i:

                def pre(module, args, kwargs, _s=s):
                    x, kw = bind_call(module, args, kwargs)
                    save(
                        {"x": _to_store(x, store_dtype), "kwargs": _store_kwargs(kw)},
                        store / _s.name / f"x{current['b']}.pt",
                    )

                handles.append(base.get_submodule(s.modules[0]).register_forward_pre_hook(pre, with_kwargs=True))
            if last_block[s.name] == i:

                def post(module, args, output, _s=s):
                    y = output[0] if isinstance(output, tuple) else output
                    save({"y": _to_store(y, store_dtype)}, store / _s.name / f"y{current['b']}.pt")

                handles.append(base.get_submodule(s.modules[-1]).register_forward_hook(post))
        block = base.get_submodule(blocks[i])
        try:
            for b in tqdm(range(n_batches), desc=f"capture: {blocks[i]}", disable=not progress, leave=False):
                current["b"] = b
                src = bdir / f"in{b}.pt"
                data = torch.load(src, weights_only=True)
                kwargs = {
                    k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device))
                    for k, v in data["kwargs"].items()
                }
                out = block(data["h"].to(device), **kwargs)
                h = out[0] if isinstance(out, tuple) else out
                save({"h": _to_store(h, None), "kwargs": data["kwargs"]}, bdir / f"in{b}.pt")
                del data, out, h
        finally:
            for hd in handles:
                hd.remove()
        for s in todo:
            if last_block[s.name] == i:
                (store / s.name / "DONE").write_text(f"{n_batches}\n")
        if on_block is not None:
            on_block(i)  # e.g. the scale benchmark samples resident memory after every block
    shutil.rmtree(bdir)
    return {"batches": n_batches, "blocks_run": n_blocks, "bytes_written": written}


def _accepts_use_cache(base: nn.Module) -> bool:
    import inspect

    return "use_cache" in inspect.signature(type(base).forward).parameters


def load_slice_features(
    store: str | os.PathLike, name: str, *, device=None, dtype: torch.dtype = torch.float32
) -> list[dict]:
    """The captured batches of slice ``name``: ``[{"x", "y", "kwargs", "token_mask"}]`` (features cast to
    ``dtype``)."""
    store = Path(store)
    if not slice_done(store, name):
        raise ValueError(f"slice {name!r} has no complete features in {store}; run capture_features first")
    n = int((store / name / "DONE").read_text())
    out = []
    for b in range(n):
        xd = torch.load(store / name / f"x{b}.pt", weights_only=True)
        yd = torch.load(store / name / f"y{b}.pt", weights_only=True)
        tm = torch.load(store / "_tokens" / f"{b}.pt", weights_only=True)["token_mask"]
        kw = {
            k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device))
            for k, v in xd["kwargs"].items()
        }
        out.append(
            {
                "x": xd["x"].to(device, dtype),
                "y": yd["y"].to(device, dtype),
                "kwargs": kw,
                "token_mask": tm.to(device),
            }
        )
    return out

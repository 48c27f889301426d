"""Teacher feature capture with forward hooks (never FX) into FeatureStores.

For each slice, a forward pre-hook (with_kwargs=True) on its first module records the input (args[0]), its other
positional arguments (named by the forward signature, e.g. block(x, gate) is replayed as block(x, gate=gate)) and
the keyword arguments blocks need (tensors, tuples of tensors such as rotary position embeddings, plain scalars);
a forward hook on its last module records the output (first element of a tuple). One teacher pass over the
calibration data fills one FeatureStore per slice.

A FeatureStore keeps chunks (one per captured batch) in memory; given a folder and a memory budget, it flushes
them to on-disk shards whenever the in-memory part exceeds the budget, and reads shards back one at a time.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ._atomic import atomic_save
from .calib import training_flags
from .slices import EXTRA_ARGS, SliceSpec

__all__ = ["Chunk", "FeatureStore", "capture_features", "default_forward", "capture_hooks", "remove_empty"]

Chunk = tuple[Tensor, Tensor | None, dict]  # (slice input, slice output or None, kwargs)
_SCALARS = (bool, int, float, str, type(None))


def _nbytes(obj) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def remove_empty(folder) -> None:
    """Remove `folder` if it exists and is empty (spill folders once their shards are gone)."""
    if folder is not None:
        try:
            Path(folder).rmdir()
        except OSError:
            pass


def _keep_kwargs(kwargs: dict) -> dict:
    """The kwargs worth storing: tensors, tuples/lists of tensors, plain scalars. Cache objects are dropped.
    Extra positional arguments (under EXTRA_ARGS) were checked when captured and are all kept."""
    out = {}
    for k, v in kwargs.items():
        if k == EXTRA_ARGS:
            out[k] = tuple(_keep_kwargs({"": a})[""] for a in v)
        elif isinstance(v, Tensor):
            out[k] = v.detach().cpu()
        elif isinstance(v, (tuple, list)) and v and all(isinstance(t, Tensor) for t in v):
            out[k] = type(v)(t.detach().cpu() for t in v)
        elif isinstance(v, _SCALARS):
            out[k] = v
    return out


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class FeatureStore:
    """Chunks of (input, output, kwargs) for one slice; in memory, or spilled to shards under a memory budget.

    Args:
        root: folder for shards; None keeps everything in memory.
        memory_budget_bytes: spill to a shard once the in-memory chunks exceed this (needs `root`).
        fp16: store floating inputs/outputs in float16 (halves memory; kwargs keep their dtype).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        memory_budget_bytes: int | None = None,
        fp16: bool = False,
    ) -> None:
        if memory_budget_bytes is not None and root is None:
            raise ValueError("FeatureStore: memory_budget_bytes needs a root folder to spill shards to")
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise ValueError(f"FeatureStore: memory_budget_bytes must be > 0, got {memory_budget_bytes}")
        self.root = Path(root) if root is not None else None
        self.memory_budget_bytes = memory_budget_bytes
        self.fp16 = fp16
        self._chunks: list[Chunk] = []
        self._shards: list[Path] = []
        self._shard_sizes: list[int] = []
        self._mem_bytes = 0
        self.num_samples = 0
        self.num_chunks = 0
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def _cast(self, t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        t = t.detach().cpu()
        return t.half() if self.fp16 and t.is_floating_point() else t

    def add(self, x: Tensor, y: Tensor | None, kwargs: dict | None = None) -> None:
        chunk = (self._cast(x), self._cast(y), _keep_kwargs(kwargs or {}))
        self._chunks.append(chunk)
        self._mem_bytes += _nbytes(chunk)
        self.num_samples += x.shape[0]
        self.num_chunks += 1
        if self.memory_budget_bytes is not None and self._mem_bytes > self.memory_budget_bytes:
            self.flush()

    def set_outputs(self, outputs: Sequence[Tensor]) -> None:
        """Replace every chunk's output (used when inputs come from one model and targets from another)."""
        chunks = list(self.chunks())
        if len(outputs) != len(chunks):
            raise ValueError(f"FeatureStore: {len(outputs)} outputs for {len(chunks)} chunks")
        self.clear()
        for (x, _, kw), y in zip(chunks, outputs, strict=True):
            self.add(x, y, kw)

    def flush(self) -> None:
        """Write the in-memory chunks to a new shard (atomically) and drop them from memory."""
        if self.root is None or not self._chunks:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"shard_{len(self._shards):05d}.pt"
        atomic_save(self._chunks, path, sync=False)  # scratch: removed once its slice is trained
        self._shards.append(path)
        self._shard_sizes.append(len(self._chunks))
        self._chunks = []
        self._mem_bytes = 0

    def clear(self) -> None:
        for p in self._shards:
            p.unlink(missing_ok=True)
        remove_empty(self.root)  # flush() makes it again if the store is refilled
        self._chunks, self._shards, self._shard_sizes, self._mem_bytes = [], [], [], 0
        self.num_samples = self.num_chunks = 0

    @property
    def memory_bytes(self) -> int:
        return self._mem_bytes

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def groups(self) -> Iterator[list[Chunk]]:
        """Chunks grouped by shard (the in-memory chunks are the last group); one shard in memory at a time."""
        for p in self._shards:
            yield torch.load(p, map_location="cpu", weights_only=True)
        if self._chunks:
            yield self._chunks

    def chunks(self) -> Iterator[Chunk]:
        for g in self.groups():
            yield from g

    def output_variance(self) -> float:
        """Variance of all stored outputs (one pass, float64 accumulation); the normalizer of the slice loss."""
        n, s, s2 = 0, 0.0, 0.0
        for _, y, _ in self.chunks():
            if y is None:
                continue
            y64 = y.double()
            n += y64.numel()
            s += float(y64.sum())
            s2 += float((y64 * y64).sum())
        if n == 0:
            raise ValueError("FeatureStore: no outputs stored")
        mean = s / n
        return max(s2 / n - mean * mean, 1e-12)

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator,
        *,
        exclude: frozenset[int] = frozenset(),
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[Chunk]:
        """One shuffled pass of training batches, skipping global chunk indices in `exclude` (held-out chunks).

        Chunks without kwargs are pooled and re-batched at random to `batch_size`; chunks with kwargs (attention
        masks, position embeddings) are yielded whole, since their kwargs belong to that batch. Only one shard is in
        memory at a time: shards come in random order, each shuffled within itself, and the samples a shard leaves
        over (fewer than `batch_size`) are pooled with the next shard, so every batch has `batch_size` samples
        (but the last) as in memory; which samples share a batch differs from an in-memory store, so a
        spilled run trains the same way but not bit for bit like an in-memory one.
        """
        sizes = self._shard_sizes + ([len(self._chunks)] if self._chunks else [])
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        order = torch.randperm(len(sizes), generator=generator).tolist()
        carry: list[Chunk] = []  # plain samples left over from the previous shard (fewer than batch_size)
        for pos, gi in enumerate(order):
            group = self._load_group(gi)
            keep = [c for i, c in enumerate(group) if offsets[gi] + i not in exclude]
            plain = carry + [c for c in keep if not c[2]]
            with_kw = [c for c in keep if c[2]]
            carry = []
            if plain:
                xs = torch.cat([c[0] for c in plain])
                ys = torch.cat([c[1] for c in plain])
                perm = torch.randperm(xs.shape[0], generator=generator)
                last = pos == len(order) - 1
                for s in range(0, xs.shape[0], batch_size):
                    idx = perm[s : s + batch_size]
                    if len(idx) < batch_size and not last:  # topped up from the next shard: full-size batches
                        carry = [(xs[idx], ys[idx], {})]
                        break
                    yield xs[idx].to(dtype), ys[idx].to(dtype), {}
            for i in torch.randperm(len(with_kw), generator=generator).tolist():
                x, y, kw = with_kw[i]
                yield x.to(dtype), y.to(dtype), kw

    def _load_group(self, gi: int) -> list[Chunk]:
        if gi < len(self._shards):
            return torch.load(self._shards[gi], map_location="cpu", weights_only=True)
        return self._chunks

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        where = f"{self.num_shards} shards in {self.root}" if self._shards else "memory"
        return f"FeatureStore({self.num_samples} samples in {self.num_chunks} chunks, {where}, fp16={self.fp16})"


def default_forward(model: nn.Module, batch, device: str | torch.device = "cpu"):
    """Run `model` on a batch from a DataLoader: (x, y) or [x, ...] uses x; a dict is passed as keyword args."""
    if isinstance(batch, dict):
        return model(**_to(batch, device))
    if isinstance(batch, (tuple, list)):
        return model(_to(batch[0], device))
    return model(_to(batch, device))


def _storable(v) -> bool:
    return isinstance(v, (Tensor, *_SCALARS)) or (
        isinstance(v, (tuple, list)) and bool(v) and all(isinstance(t, Tensor) for t in v)
    )


def _bind_extras(name: str, module: nn.Module, extra: tuple, kwargs: dict) -> dict:
    """The positional arguments after the first, as keyword arguments named by the forward signature (or, for
    *args and positional-only parameters, under EXTRA_ARGS, replayed positionally by run_slice)."""
    if not extra:
        return {}
    for i, v in enumerate(extra, start=2):
        if not _storable(v):
            raise ValueError(
                f"slice {name!r}: its first module ({type(module).__name__}) gets a {type(v).__name__} as positional "
                f"argument {i}, which cannot be stored and replayed (tensors, tuples of tensors and plain scalars "
                f"can); pass it as a keyword argument, or slice the module that calls it"
            )
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1 : 1 + len(extra)]
    except (TypeError, ValueError):
        params = []
    named = len(params) == len(extra) and all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    if named and not any(p.name in kwargs for p in params):
        return {p.name: v for p, v in zip(params, extra, strict=True)}
    return {EXTRA_ARGS: tuple(extra)}


class capture_hooks:
    """Context manager: hooks that record each slice's input/kwargs and output for every forward of `model`.

    After each forward, `self.records[name]` holds (x, y, kwargs) of that forward; `outputs=False` records only
    inputs (sequential mode only needs the hybrid model's inputs).
    """

    def __init__(self, model: nn.Module, specs: Sequence[SliceSpec], *, inputs: bool = True, outputs: bool = True):
        self.model, self.specs, self.inputs, self.outputs = model, list(specs), inputs, outputs
        self.records: dict[str, list] = {}
        self._handles = []

    def __enter__(self) -> capture_hooks:
        for spec in self.specs:
            first = self.model.get_submodule(spec.modules[0])
            last = self.model.get_submodule(spec.modules[-1])
            if self.inputs:
                self._handles.append(first.register_forward_pre_hook(self._pre(spec.name), with_kwargs=True))
            if self.outputs:
                self._handles.append(last.register_forward_hook(self._post(spec.name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        self.records = {}

    def _rec(self, name: str) -> list:
        return self.records.setdefault(name, [None, None, {}, 0, 0])  # x, y, kwargs, n_in, n_out

    def _pre(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            rec = self._rec(name)
            if args:
                x, kw = args[0], {**kwargs, **_bind_extras(name, module, args[1:], kwargs)}
            elif "hidden_states" in kwargs:  # HF blocks may be called with hidden_states as a keyword
                x, kw = kwargs["hidden_states"], {k: v for k, v in kwargs.items() if k != "hidden_states"}
            else:
                raise ValueError(
                    f"slice {name!r}: its first module was called without a positional input; "
                    f"slices need modules called as module(x, ...)"
                )
            rec[0], rec[2] = x.detach(), _keep_kwargs(kw)
            rec[3] += 1

        return hook

    def _post(self, name: str) -> Callable:
        def hook(module, args, out):
            rec = self._rec(name)
            rec[1] = (out[0] if isinstance(out, tuple) else out).detach()
            rec[4] += 1

        return hook

    def take(self, name: str) -> Chunk:
        """The (x, y, kwargs) recorded for slice `name` in the last forward; checks it ran exactly once."""
        rec = self.records.get(name)
        if rec is None or (self.inputs and rec[3] != 1) or (self.outputs and rec[4] != 1):
            n_in, n_out = (rec[3], rec[4]) if rec else (0, 0)
            raise ValueError(
                f"slice {name!r}: its modules ran {n_in} (first) / {n_out} (last) times in one forward; "
                f"a slice must run exactly once per forward (shared or unused modules cannot be sliced)"
            )
        return rec[0], rec[1], rec[2]


@torch.no_grad()
def capture_features(
    model: nn.Module,
    specs: Sequence[SliceSpec],
    loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    root: str | os.PathLike | None = None,
    memory_budget_bytes: int | None = None,
    fp16: bool = False,
    forward_fn: Callable = default_forward,
    inputs: bool = True,
    outputs: bool = True,
    progress: bool = True,
    desc: str = "capture",
) -> dict[str, FeatureStore]:
    """One pass of `model` (eval mode) over `loader`, filling a FeatureStore per slice.

    With `root`, stores live in root/<slice name>/ and spill to shards when their in-memory part exceeds
    `memory_budget_bytes / len(specs)` (the budget is shared by all slices).
    """
    from tqdm.auto import tqdm

    per_slice = None if memory_budget_bytes is None else max(memory_budget_bytes // max(len(specs), 1), 1)
    stores = {s.name: FeatureStore(None if root is None else Path(root) / s.name, per_slice, fp16) for s in specs}
    with training_flags(model), capture_hooks(model, specs, inputs=inputs, outputs=outputs) as hooks:
        for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
            hooks.reset()
            forward_fn(model, batch, device)
            for s in specs:
                x, y, kw = hooks.take(s.name)
                stores[s.name].add(x, y, kw)
    if not any(len(st) for st in stores.values()):
        raise ValueError("capture_features: the calibration loader yielded no batches")
    return stores

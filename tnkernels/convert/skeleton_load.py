"""Putting a checkpoint's tensors into the skeleton load_compressed has rebuilt (convert/io.py): copied into a
dense skeleton, assigned in place of a meta-device skeleton's tensors. Names and shapes are checked against the
skeleton before anything is written, so a refused load leaves the skeleton's tensors as they were."""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model
from torch import nn


def load_weights(model: nn.Module, target: nn.Module, weights_file: Path, buffers_file: Path) -> None:
    """Load `weights_file` into `target` (the part of `model` the checkpoint was saved from). RuntimeError or
    KeyError when the file does not fit; nothing is written then."""
    if any(t.is_meta for t in chain(target.parameters(), target.buffers())):
        _assign_weights(model, target, weights_file, buffers_file)
    else:
        _check_fits(target, weights_file)  # before load_model copies the tensors that do fit
        with _module_versions(target):
            load_model(target, str(weights_file), strict=True)


@contextmanager
def _module_versions(target: nn.Module):
    """Hand load_state_dict the skeleton's module versions with the file's tensors. A plain dict (what safetensors'
    load_model passes) has none, and a module that checks its version when loaded refuses that: torchvision's
    MNASNet raised "version should be set to 1 or 2 instead of None", so every MNASNet checkpoint was written and
    then refused (2026-12-02). The file was saved from the same classes, so their versions are the skeleton's."""
    metadata = target.state_dict()._metadata

    def load_state_dict(state_dict, *args, **kwargs):
        state_dict = OrderedDict(state_dict)
        state_dict._metadata = metadata
        return type(target).load_state_dict(target, state_dict, *args, **kwargs)

    target.load_state_dict = load_state_dict  # an instance attribute, for this load only
    try:
        yield
    finally:
        del target.load_state_dict


def _assign_weights(model: nn.Module, target: nn.Module, weights_file: Path, buffers_file: Path) -> None:
    """Load into a skeleton built on the meta device (`with torch.device("meta"): skeleton = Model(...)`).

    Its dense weights were never allocated, and copying into a meta tensor is a no-op, so the checkpoint's CPU
    tensors are assigned in their place: the peak memory of a load is then the compressed model's, not the dense
    skeleton's plus it. Weights tied in the skeleton (GPT-2's lm_head and wte) are tied again afterwards, since
    assigning replaces one of them only; the non-persistent buffers come from buffers.safetensors."""
    prefix = next(name for name, module in model.named_modules() if module is target)
    prefix = f"{prefix}." if prefix else ""
    ties = [names for names in _names_per_tensor(model) if len(names) > 1]
    target_state = target.state_dict(keep_vars=True)
    wanted = {name: t.dtype for name, t in target_state.items()}
    target_shapes = {name: t.shape for name, t in target_state.items()}
    state = {  # the skeleton's dtypes, as a load into a dense skeleton casts (assign would keep the file's)
        name: t.to(wanted[name]) if name in wanted and t.is_floating_point() and t.dtype != wanted[name] else t
        for name, t in _owned(weights_file).items()
    }
    # The ties the saved model had, from the file: safetensors' save_model keeps one name per shared tensor and
    # records each dropped name -> the kept one in the header's metadata. A skeleton built with accelerate's
    # init_empty_weights() or moved with .to("meta") has lost its ties (each parameter was replaced on its own),
    # so its own ties above cannot name the dropped keys (before 2026-12-02: "missing keys ... belongs to another
    # model"); these are tied again below like the skeleton's.
    saved_ties = [[prefix + kept, prefix + name] for name, kept in _dropped_names(weights_file).items()
                  if name in wanted and name not in state and kept in state]  # fmt: skip
    ties += saved_ties
    tied = {name for names in ties for name in names}
    # Checked before anything is assigned, so that a refused load leaves the skeleton as it was.
    untied = [name for name in wanted if name not in state and prefix + name not in tied]
    unexpected = [name for name in state if name not in wanted]
    wrong = [n for n, t in state.items() if n in wanted and tuple(t.shape) != tuple(target_shapes[n])]
    if unexpected or untied or wrong:
        raise RuntimeError(f"missing keys {untied[:5]}, unexpected keys {unexpected[:5]}, other shapes {wrong[:5]}")
    state = OrderedDict(state)
    state._metadata = target_state._metadata  # the module versions, as in _module_versions
    target.load_state_dict(state, strict=False, assign=True)
    if (buffers_file).is_file():
        for name, value in _owned(buffers_file).items():  # names relative to the saved model: target
            owner, _, attr = (prefix + name).rpartition(".")
            module = model.get_submodule(owner)
            meta = module._buffers.get(attr)
            if meta is not None and meta.is_meta:  # in the skeleton's dtype, as the dense skeleton has it: a bf16
                # model's buffers file in a float32 skeleton gave bf16 buffers beside float32 weights (2026-12-02)
                module._buffers[attr] = value.to(meta.dtype) if value.is_floating_point() else value
    for names in ties:
        _retie(model, names)
    still_meta = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(
            f"load_compressed: {len(still_meta)} tensors of the meta-device skeleton have no value in the "
            f"checkpoint ({', '.join(still_meta[:5])}); build those parts of the skeleton on a real device"
        )


# safetensors' dtype names (its format's header) for the dtypes a model holds
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _owned(file: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, each read straight into memory of torch's own allocator (64-byte aligned).

    safetensors maps the file and hands out tensors at the file's offsets (4-byte aligned), or with pread in
    buffers of its own (16-byte aligned): kernels then take other SIMD paths, and a model loaded that way gave
    outputs that differed in the last bit from the same weights copied into a dense skeleton (seen in the test
    suite). Copying them would hold two copies at once, or count the mapped file in the peak RSS (GPT-2 XL's
    shapes at ratio 4: 2.77-4.10 GiB, against 2.45 here and 2.15 for the mapped tensors left unaligned). So the
    tensors are read into torch.empty buffers at the offsets in the file's header (8-byte length, JSON, data: the
    format's spec); a dtype this does not know is left to safetensors."""
    with open(file, "rb", buffering=0) as fh:  # unbuffered: readinto goes straight into the tensor
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        header.pop("__metadata__", None)
        start = 8 + header_len
        tensors = {}
        for key, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                with safe_open(str(file), framework="pt") as f:
                    tensors[key] = f.get_tensor(key).clone()
                continue
            t = torch.empty(entry["shape"], dtype=dtype)
            begin, end = entry["data_offsets"]
            if t.numel() * t.element_size() != end - begin:
                raise ValueError(f"load_compressed: {file} is corrupted (tensor {key!r} has the wrong size)")
            fh.seek(start + begin)
            view, done = memoryview(t.view(-1).view(torch.uint8).numpy()), 0
            while done < len(view):  # a read may return less (Linux: at most ~2 GiB per call)
                got = fh.readinto(view[done:])
                if not got:
                    raise ValueError(f"load_compressed: {file} is truncated")
                done += got
            tensors[key] = t
    return tensors


def _check_fits(target: nn.Module, file: Path) -> None:
    """RuntimeError if the file's tensors (names and shapes, read from its header) do not match the state of
    `target`, so that a failed load has written nothing into the skeleton."""
    with safe_open(str(file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    dropped = _dropped_names(file)
    state = target.state_dict()
    missing = [n for n in state if n not in shapes and dropped.get(n) not in shapes]
    unexpected = [k for k in shapes if k not in state]
    wrong = [
        f"{n}: {shapes[n]} in the file, {tuple(t.shape)} here"
        for n, t in state.items()
        if n in shapes and shapes[n] != tuple(t.shape)
    ]
    if missing or unexpected or wrong:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, other shapes {wrong[:5]}")


def _dropped_names(file: Path) -> dict[str, str]:
    """{name left out of the file: the name it was saved under}, for tensors shared between names (save_model's
    metadata; a name that is not a key of the file is not such an entry)."""
    with safe_open(str(file), framework="pt") as f:
        metadata, keys = f.metadata() or {}, set(f.keys())
    return {k: v for k, v in metadata.items() if k not in keys and v in keys}


def _names_per_tensor(model: nn.Module) -> list[list[str]]:
    """Qualified names of every parameter and buffer, grouped by the tensor they name (shared weights)."""
    groups: dict[int, list[str]] = {}
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _retie(model: nn.Module, names: list[str]) -> None:
    """Point every name of a tied group at the one tensor of the group that holds a value."""
    slots = []
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        slots.append((module._parameters if attr in module._parameters else module._buffers, attr))
    loaded = next((table[attr] for table, attr in slots if not table[attr].is_meta), None)
    if loaded is not None:
        for table, attr in slots:
            table[attr] = loaded

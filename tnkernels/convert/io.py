"""save_compressed / load_compressed: safetensors weights plus a JSON spec of every tensorized layer.

Layout of the checkpoint directory:
    model.safetensors   the full state of the compressed model (tensorized and dense layers, buffers)
    buffers.safetensors the non-persistent buffers (rotary frequencies, position ids), only if the model has any:
                        a skeleton built on the meta device has no values for them (since 2026-12-02; optional)
    spec.json           format version, package version, sha256 of model.safetensors, and one entry per tensorized
                        layer (kind, modes and bonds or ranks, conv parameters, dtype, aliases of shared modules)
The directory is written under a temporary name and renamed into place, so a crash never leaves a half-written
checkpoint behind. Users' checkpoints must keep loading: the format, the older variants still read and when
FORMAT_VERSION changes are in docs/ARCHITECTURE.md ("Compressed checkpoints"); tests/test_golden_checkpoints.py
loads files written by earlier versions (tests/data/checkpoints/, never regenerated).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model
from torch import nn
from torch.nn.utils import parametrize, prune, skip_init

from .._version import __version__
from ..nn import MPOLinear, TuckerConv2d, is_hf_conv1d, linear_weight
from ..ops.dispatch import check_backend
from .hf_save import guard_save_pretrained
from .skeleton_load import load_weights
from .tensorize import _module_aliases, _set_submodule, keep_transformer_layers_on_their_regular_path, unwrapped

FORMAT = "tnkernels-compressed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
BUFFERS_FILE = "buffers.safetensors"
SPEC_FILE = "spec.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_spec(module: nn.Module) -> dict:
    if isinstance(module, MPOLinear):
        return {
            "kind": "mpo_linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "in_modes": list(module.in_modes),
            "out_modes": list(module.out_modes),
            "bonds": list(module.bonds),
            "bias": module.bias is not None,
            "dtype": _dtype_name(module.cores[0].dtype),
            "backend": module.backend,
        }
    return {
        "kind": "tucker_conv2d",
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": list(module.kernel_size),
        "ranks": list(module.ranks),
        "stride": list(module.stride),
        "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
        "dilation": list(module.dilation),
        "padding_mode": module.padding_mode,
        "bias": module.bias is not None,
        "dtype": _dtype_name(module.core.dtype),
        "backend": module.backend,
    }


def _readable_by_all(folder: Path) -> None:
    """mkdtemp makes the folder 0700 (and a writer may make files 0600): 0755 and 0644, the modes distill's atomic
    writes give every other output. (Reading the umask would mean setting it: process-wide, racy with threads.)"""
    for f in folder.iterdir():
        os.chmod(f, 0o644)
    os.chmod(folder, 0o755)


def save_compressed(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` (with tensorized layers) to the directory `path` atomically; return the path. A model wrapped
    by torch.compile or (Distributed)DataParallel is saved as the model inside, so it loads into a plain skeleton."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_compressed: model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    _check_replaceable(path)
    model = unwrapped(model)
    aliases = _module_aliases(model)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (MPOLinear, TuckerConv2d)):
            _check_plain_state(name, module)
            entry = _layer_spec(module)
            entry["aliases"] = [a for a in aliases[id(module)] if a != name]
            layers[name] = entry
    if not layers:
        raise ValueError("save_compressed: the model has no tensorized layers; call tnkernels.tensorize(model) first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_model(model, str(tmp / WEIGHTS_FILE))
        extra = _non_persistent_buffers(model)
        if extra:
            save_file(extra, str(tmp / BUFFERS_FILE))
        spec = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tnkernels_version": __version__,
            "model_class": type(model).__name__,
            "sha256": _sha256(tmp / WEIGHTS_FILE),
            **({"buffers_sha256": _sha256(tmp / BUFFERS_FILE)} if extra else {}),
            "layers": layers,
        }
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        _readable_by_all(tmp)
        backup = None
        if path.exists():
            backup = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(backup)
        tmp.rename(path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_plain_state(name: str, layer: nn.Module) -> None:
    """Refuse a tensorized layer pruned or parametrized by torch.nn.utils: its state holds `<p>_orig` and `<p>_mask`
    or `parametrizations.<p>.original` in place of `<p>`, and load_compressed rebuilds the layer plain, so the
    checkpoint could never be loaded (it was written, then refused at load time as "another model")."""
    for sub_name, sub in layer.named_modules(prefix=name):
        prunes = [h._tensor_name for h in sub._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
        if prunes:
            raise ValueError(
                f"save_compressed: {sub_name!r} is pruned ({', '.join(prunes)}: torch.nn.utils.prune), and a "
                "checkpoint of it could not be loaded (load_compressed rebuilds tensorized layers unpruned); make "
                f"the pruning permanent first: torch.nn.utils.prune.remove(model.get_submodule({sub_name!r}), "
                f"{prunes[0]!r})"
            )
        if parametrize.is_parametrized(sub):
            raise ValueError(
                f"save_compressed: {sub_name!r} is parametrized ({', '.join(sub.parametrizations)}: "
                "torch.nn.utils.parametrize), and a checkpoint of it could not be loaded (load_compressed rebuilds "
                "tensorized layers plain); remove the parametrization first: torch.nn.utils.parametrize."
                f"remove_parametrizations(model.get_submodule({sub_name!r}), {next(iter(sub.parametrizations))!r}, "
                "leave_parametrized=True)"
            )


def _check_replaceable(path: Path) -> None:
    """Refuse a `path` whose contents the save would replace (and delete) but that is not a checkpoint: a file, or a
    directory with other files in it (save_compressed(model, ".") used to delete the working directory)."""
    if not path.exists():
        return
    if path.is_dir() and ((path / SPEC_FILE).is_file() or not any(path.iterdir())):
        return  # an earlier checkpoint (replaced atomically) or an empty directory
    what = "a file" if path.is_file() else "a directory that is not a tnkernels checkpoint"
    raise ValueError(
        f"save_compressed: path {str(path)!r} is {what}; saving replaces the whole path, so pass a new or empty "
        "directory (or an earlier checkpoint's) instead"
    )


def read_spec(path: str | os.PathLike) -> dict:
    """Read and validate spec.json of a compressed checkpoint (checksum included)."""
    path = Path(path)
    spec_file, weights_file = path / SPEC_FILE, path / WEIGHTS_FILE
    if not spec_file.is_file() or not weights_file.is_file():
        raise ValueError(
            f"load_compressed: {path} is not a compressed checkpoint (expected {SPEC_FILE} and {WEIGHTS_FILE}); "
            "create one with tnkernels.save_compressed"
        )
    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_compressed: {spec_file} is corrupted ({exc})") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or "layers" not in spec:
        raise ValueError(f"load_compressed: {spec_file} is not a {FORMAT} spec")
    if spec.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"load_compressed: {path} uses format version {spec['format_version']}; this tnkernels reads up to "
            f"{FORMAT_VERSION}; upgrade tnkernels"
        )
    if _sha256(weights_file) != spec.get("sha256"):
        raise ValueError(f"load_compressed: {weights_file} does not match its checksum: the file is corrupted")
    buffers_file = path / BUFFERS_FILE
    if "buffers_sha256" in spec and (not buffers_file.is_file() or _sha256(buffers_file) != spec["buffers_sha256"]):
        raise ValueError(f"load_compressed: {buffers_file} is missing or does not match its checksum")
    return spec


def _build_layer(name: str, entry: dict, old: nn.Module) -> nn.Module:
    kind = entry.get("kind")
    device = next((t.device for t in old.parameters()), torch.device("cpu"))
    # In the skeleton's dtype, as load_state_dict casts the dense weights into it: a bf16 checkpoint loaded into a
    # float32 skeleton gives a float32 model, on a dense skeleton and a meta one alike (not a mix of both dtypes).
    dtype = next((t.dtype for t in old.parameters() if t.is_floating_point()), getattr(torch, entry["dtype"]))
    if kind == "mpo_linear":
        if isinstance(old, MPOLinear):
            shape = (old.out_features, old.in_features)
        elif isinstance(old, nn.Linear) or is_hf_conv1d(old):
            shape = tuple(linear_weight(old).shape)
        else:
            raise ValueError(
                f"load_compressed: layer {name!r} is a {type(old).__name__} in the skeleton but an MPO linear layer "
                "in the checkpoint; the checkpoint belongs to another model"
            )
        if shape != (entry["out_features"], entry["in_features"]):
            raise ValueError(
                f"load_compressed: layer {name!r} is {shape[1]}->{shape[0]} in the skeleton but "
                f"{entry['in_features']}->{entry['out_features']} in the checkpoint; "
                "the checkpoint belongs to another model"
            )
        return skip_init(  # weights come from the checkpoint: no random init
            MPOLinear,
            entry["in_features"],
            entry["out_features"],
            in_modes=entry["in_modes"],
            out_modes=entry["out_modes"],
            bonds=entry["bonds"],
            bias=entry["bias"],
            backend=entry.get("backend", "auto"),
            device=device,
            dtype=dtype,
        )
    if kind == "tucker_conv2d":
        if not isinstance(old, (nn.Conv2d, TuckerConv2d)):
            raise ValueError(
                f"load_compressed: layer {name!r} is a {type(old).__name__} in the skeleton but a Tucker conv in the "
                "checkpoint; the checkpoint belongs to another model"
            )
        shape = (old.out_channels, old.in_channels, *old.kernel_size)
        want = (entry["out_channels"], entry["in_channels"], *entry["kernel_size"])
        if tuple(shape) != tuple(want):
            raise ValueError(
                f"load_compressed: conv {name!r} has shape {tuple(shape)} in the skeleton but {tuple(want)} in the "
                "checkpoint; the checkpoint belongs to another model"
            )
        padding = entry["padding"] if isinstance(entry["padding"], str) else tuple(entry["padding"])
        return skip_init(
            TuckerConv2d,
            entry["in_channels"],
            entry["out_channels"],
            tuple(entry["kernel_size"]),
            ranks=tuple(entry["ranks"]),
            stride=tuple(entry["stride"]),
            padding=padding,
            dilation=tuple(entry["dilation"]),
            bias=entry["bias"],
            padding_mode=entry.get("padding_mode", "zeros"),  # absent in checkpoints from before 2026-12-02
            backend=entry.get("backend", "auto"),
            device=device,
            dtype=dtype,
        )
    raise ValueError(f"load_compressed: layer {name!r} has unknown kind {kind!r}")


def _checkpoint_root(model: nn.Module, names: list[str]) -> nn.Module:
    """The module the checkpoint's layer names are relative to: `model`, or else its one submodule under which
    every name exists. A checkpoint of a Hugging Face base model ("h.0.mlp.c_fc") then loads into the model with
    its head ("transformer.h.0.mlp.c_fc"), whose head weights stay the skeleton's."""
    modules = dict(model.named_modules())
    if not names or all(n in modules for n in names):
        return model
    prefixes = {m[: -len(names[0])] for m in modules if m.endswith("." + names[0])}
    fits = [p for p in prefixes if all(p + n in modules for n in names)]
    return model.get_submodule(fits[0][:-1]) if len(fits) == 1 else model  # else: the error names the layer


def load_compressed(model: nn.Module, path: str | os.PathLike, *, backend: str | None = None) -> nn.Module:
    """Rebuild the tensorized layers of `path` inside the uncompressed skeleton `model` (in place, no
    decomposition), load every weight, and return the model. Mismatches and corrupted files raise ValueError.
    The model keeps the skeleton's dtype (the file's values are cast, as load_state_dict does).

    Each layer runs the backend it was saved with, unless `backend` ("auto", "torch", "triton", "native") is
    given: a model saved on a GPU with backend="triton" loads on a CPU with backend="auto".

    The checkpoint may hold a submodule of `model`: one saved from a Hugging Face base model (what `tnk compress`
    writes) loads into `AutoModel` and into `AutoModelForCausalLM` alike."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_compressed: model must be the uncompressed skeleton (a torch.nn.Module instance), got "
            f"{model.__name__ if isinstance(model, type) else type(model).__name__}; build it first, e.g. Model(...)"
        )
    spec = read_spec(path)
    if backend is not None:  # before the skeleton is changed
        for entry in spec["layers"].values():
            check_backend(backend, "load_compressed", entry.get("kind"))
    target = _checkpoint_root(model, list(spec["layers"]))
    root = next(f"{n}." if n else "" for n, m in model.named_modules() if m is target)  # target's name in model
    swaps: list[tuple[str, nn.Module, nn.Module]] = []  # (name, skeleton's layer, tensorized layer)
    for name, entry in spec["layers"].items():
        try:
            old = target.get_submodule(name)
        except AttributeError:
            saved_from, here = spec.get("model_class"), type(model).__name__
            which = (
                f"was saved from a {saved_from}, the skeleton is a {here}: load it into the model it was saved from"
                if saved_from and saved_from != here
                else "belongs to another model"
            )
            raise ValueError(
                f"load_compressed: the checkpoint has a tensorized layer {name!r} that the skeleton model lacks; "
                f"the checkpoint {which}"
            ) from None
        new = _build_layer(name, entry if backend is None else {**entry, "backend": backend}, old)
        new.tensorized_name = root + name  # named by the error for code that reads its .weight (no_dense_weight.py)
        swaps += [(alias, target.get_submodule(alias), new) for alias in [name, *entry.get("aliases", [])]]
    # Swapped in once every layer is built, and swapped back if the weights do not fit: a failed load used to
    # leave the skeleton half converted.
    for alias, _, new in swaps:
        _set_submodule(target, alias, new)
    try:
        load_weights(model, target, Path(path) / WEIGHTS_FILE, Path(path) / BUFFERS_FILE)
    except (RuntimeError, KeyError) as exc:
        for alias, old, _ in reversed(swaps):
            _set_submodule(target, alias, old)
        raise ValueError(
            f"load_compressed: the weights in {path} do not fit the skeleton ({str(exc)[:500]}); "
            "the checkpoint belongs to another model or version"
        ) from exc
    keep_transformer_layers_on_their_regular_path(target)
    guard_save_pretrained(model)  # from_pretrained would reload it dense and random: hf_save.py
    return model


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers state_dict leaves out, by qualified name, as CPU copies (safetensors refuses shared storage)."""
    found = {}
    for prefix, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buf = module._buffers.get(name)
            if buf is not None and not buf.is_meta:
                found[f"{prefix}.{name}" if prefix else name] = buf.detach().to("cpu", copy=True)
    return found

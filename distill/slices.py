"""Slices: contiguous parts of a model with one input tensor and one output tensor.

A slice is a list of qualified module names executed in order (see `run_slice`). Presets cut torchvision ResNets
per conv, per BasicBlock/Bottleneck, or per stage; `slices_from_names` builds slices from user-given names, where
"a+b" groups consecutive modules into one slice.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = [
    "PRESETS",
    "SliceSpec",
    "run_slice",
    "resnet_slices",
    "slices_from_names",
    "make_slices",
    "validate_slices",
    "slice_modules",
    "build_slice_container",
    "set_submodule",
]

PRESETS = ("per-block", "per-conv", "per-stage")


@dataclass(frozen=True)
class SliceSpec:
    """One slice: `modules` are qualified names of consecutive submodules, executed in order."""

    name: str  # unique; used in checkpoint file names
    modules: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ValueError(f"SliceSpec: name {self.name!r} must be non-empty and usable as a file name")
        if not self.modules:
            raise ValueError(f"SliceSpec {self.name!r}: needs at least one module name")
        object.__setattr__(self, "modules", tuple(self.modules))


EXTRA_ARGS = "*args"  # kwargs key of a first module's extra positional arguments that have no keyword name


def run_slice(modules: Sequence[nn.Module], x: Tensor, kwargs: dict | None = None) -> Tensor:
    """Run `modules` in order on `x`, passing `kwargs` to each; a tuple output contributes its first element.
    Positional arguments stored under EXTRA_ARGS are passed after `x`."""
    kwargs = dict(kwargs or {})
    extra = tuple(kwargs.pop(EXTRA_ARGS, ()))
    for m in modules:
        out = m(x, *extra, **kwargs)
        x = out[0] if isinstance(out, tuple) else out
    return x


def _stage_names(model: nn.Module) -> list[str]:
    names = [n for n in ("layer1", "layer2", "layer3", "layer4") if isinstance(getattr(model, n, None), nn.Sequential)]
    if not names:
        raise ValueError(
            f"ResNet presets need a torchvision-style ResNet (layer1..layer4 Sequentials); {type(model).__name__} "
            f"has none. Define slices by module names instead (slices_from_names / --slices NAME ...)"
        )
    return names


def resnet_slices(model: nn.Module, preset: str = "per-block") -> list[SliceSpec]:
    """Slices of a torchvision ResNet's residual stages (stem and classifier head stay out, they remain dense).

    per-stage: layer1 ... layer4. per-block: layer1.0, layer1.1, ... per-conv: every Conv2d inside the stages,
    downsample convs included, each alone (input and output of the conv itself).
    """
    if preset not in PRESETS:
        raise ValueError(
            f"--slices: unknown preset {preset!r}; choose one of {', '.join(PRESETS)} or give module names"
        )
    stages = _stage_names(model)
    if preset == "per-stage":
        return [SliceSpec(s, (s,)) for s in stages]
    if preset == "per-block":
        return [SliceSpec(f"{s}.{i}", (f"{s}.{i}",)) for s in stages for i in range(len(getattr(model, s)))]
    specs = []
    for s in stages:
        for name, m in getattr(model, s).named_modules():
            if isinstance(m, nn.Conv2d):
                specs.append(SliceSpec(f"{s}.{name}", (f"{s}.{name}",)))
    return specs


def slices_from_names(model: nn.Module, names: Iterable[str]) -> list[SliceSpec]:
    """One slice per entry; "a+b+c" makes one slice of consecutive modules a, b, c (named "a+b+c")."""
    specs = [SliceSpec(entry, tuple(p.strip() for p in entry.split("+"))) for entry in names]
    validate_slices(model, specs)
    return specs


def make_slices(model: nn.Module, slices: str | Sequence[str] | Sequence[SliceSpec] = "per-block") -> list[SliceSpec]:
    """Resolve a preset name, a list of module names, or a list of SliceSpec into validated SliceSpecs."""
    if isinstance(slices, str):
        slices = [slices]
    slices = list(slices)
    if not slices:
        raise ValueError("--slices: empty; give a preset (per-block, per-conv, per-stage) or module names")
    if all(isinstance(s, SliceSpec) for s in slices):
        specs = slices
    elif len(slices) == 1 and slices[0] in PRESETS:
        specs = resnet_slices(model, slices[0])
    else:
        specs = slices_from_names(model, [str(s) for s in slices])
    validate_slices(model, specs)
    return specs


def validate_slices(model: nn.Module, specs: Sequence[SliceSpec]) -> None:
    """Unknown module names, duplicate slice names, and modules claimed by two slices raise ValueError."""
    known = dict(model.named_modules())
    aliases: dict[int, list[str]] = {}  # every name of every module object, shared ones under several
    for n, mod in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(mod), []).append(n)
    seen_names: set[str] = set()
    owner: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen_names:
            raise ValueError(f"slices: duplicate slice name {spec.name!r}")
        seen_names.add(spec.name)
        for m in spec.modules:
            if m and m not in known and _shared_alias(model, m, aliases) is not None:
                names = _shared_alias(model, m, aliases)
                raise ValueError(
                    f"slice {spec.name!r}: module {m!r} is shared: the same module is also {', '.join(names)} "
                    f"(named_modules() lists it as {names[0]!r}); a shared module cannot be sliced, since the "
                    f"student would untie it. Slice modules that are not shared"
                )
            if m not in known or m == "":
                close = difflib.get_close_matches(m, [k for k in known if k], n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"slice {spec.name!r}: unknown module name {m!r} in {type(model).__name__}{hint}")
            for other, other_spec in owner.items():
                if other_spec == spec.name and (m == other or m.startswith(other + ".") or other.startswith(m + ".")):
                    raise ValueError(
                        f"slice {spec.name!r} names module {m!r} twice (or with a module inside it); "
                        f"a group lists each module once"
                    )
                if m == other or m.startswith(other + ".") or other.startswith(m + "."):
                    raise ValueError(
                        f"slices {other_spec!r} and {spec.name!r} overlap on module {m!r}; "
                        f"each module may belong to one slice"
                    )
            owner[m] = spec.name
        _check_shared(model, spec, aliases)
        _check_group(model, spec)


def _shared_alias(model: nn.Module, name: str, aliases: dict[int, list[str]]) -> list[str] | None:
    """The other names of the module at `name` when it is shared (None when `name` is not a module path)."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    names = [n for n in aliases.get(id(mod), []) if n != name]
    return names or None


def _check_shared(model: nn.Module, spec: SliceSpec, aliases: dict[int, list[str]]) -> None:
    """Refuse a slice holding a module or parameter that is also reachable outside it (the same object under
    several names): the slice is copied, tensorized and trained alone, so the student would untie it."""

    def outside(names: list[str]) -> list[str]:
        return [n for n in names if not any(n == s or n.startswith(s + ".") for s in spec.modules)]

    for name in spec.modules:
        for sub, mod in model.get_submodule(name).named_modules(remove_duplicate=False):
            others = outside(aliases.get(id(mod), []))
            if others and any(True for _ in mod.parameters()):
                full = f"{name}.{sub}" if sub else name
                raise ValueError(
                    f"slice {spec.name!r}: module {full!r} is shared with {', '.join(others)} outside the slice (the "
                    f"same module under several names); a shared module cannot be sliced, since the student "
                    f"would untie it. Leave it out of the slices (slice the modules around it)"
                )
    params: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), []).append(n)
    for name in spec.modules:
        for pn, p in model.get_submodule(name).named_parameters(remove_duplicate=False):
            others = outside(params[id(p)])
            if others:
                raise ValueError(
                    f"slice {spec.name!r}: parameter {name}.{pn} is tied to {', '.join(others)} outside the slice "
                    f"(one tensor under several names); the student would untie it. Leave the tied layers out of "
                    f"the slices"
                )


def _check_group(model: nn.Module, spec: SliceSpec) -> None:
    """A group "a+b+c" must be sibling modules (one parent), consecutive and in order in the parent's children
    (run_slice feeds each module's output to the next)."""
    if len(spec.modules) < 2:
        return
    parents = {n.rpartition(".")[0] for n in spec.modules}
    if len(parents) > 1:
        raise ValueError(
            f"slice {spec.name!r}: a group's modules must share one parent; {', '.join(spec.modules)} have parents "
            f"{', '.join(repr(p) for p in sorted(parents))}. Group consecutive children of one module"
        )
    parent = parents.pop()
    children = list((model.get_submodule(parent) if parent else model)._modules)
    idx = [children.index(n.rpartition(".")[2]) for n in spec.modules]
    if idx != list(range(idx[0], idx[0] + len(idx))):
        prefix = f"{parent}." if parent else ""
        lo, hi = min(idx), max(idx)
        if sorted(idx) != idx:
            why = "are not in the order of the parent's children"
        else:
            missing = [prefix + children[i] for i in range(lo, hi + 1) if i not in idx]
            why = f"skip {', '.join(missing)}"
        want = "+".join(prefix + c for c in children[lo : hi + 1])
        raise ValueError(
            f"slice {spec.name!r}: a group must be consecutive modules in order; its modules {why} (the modules "
            f"from the first to the last are {want}). Group consecutive modules, or make separate slices"
        )


def slice_modules(root: nn.Module, spec: SliceSpec) -> list[nn.Module]:
    """The live modules of `spec` inside `root` (a model or a container from build_slice_container)."""
    return [root.get_submodule(n) for n in spec.modules]


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified `name` (nn.Module.set_submodule needs torch >= 2.5; this does not)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def build_slice_container(model: nn.Module, spec: SliceSpec) -> nn.Module:
    """A standalone module holding deep copies of the slice's modules at the same qualified names.

    Keeping the names means tensorize rules written for the whole model (fnmatch on qualified names) apply to the
    slice unchanged, and a trained slice is put back into a model by name.
    """
    import copy

    root = nn.Module()
    for name in spec.modules:
        parts = name.split(".")
        node = root
        for p in parts[:-1]:
            if p not in node._modules:
                node.add_module(p, nn.Module())
            node = node._modules[p]
        node.add_module(parts[-1], copy.deepcopy(model.get_submodule(name)))
    return root


def count_params(modules: Iterable[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def slice_forward(root: nn.Module, spec: SliceSpec, x: Tensor, kwargs: dict | None = None) -> Tensor:
    """run_slice on the slice's modules inside `root`."""
    return run_slice(slice_modules(root, spec), x, kwargs)

"""tensorize(model): replace Linear / Conv1D / Conv2d layers in place by MPOLinear / TuckerConv2d."""

from __future__ import annotations

import difflib
import fnmatch
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

from ..decompose import RatioUnreachableError, check_ratio
from ..nn import MPOLinear, TuckerConv2d, is_hf_conv1d, linear_weight
from .hf_save import guard_save_pretrained
from .report import LayerReport, TensorizeReport
from .weight_readers import weight_reader

_MPO_KEYS = {"ratio", "rel_tol", "max_bond", "num_cores", "in_modes", "out_modes", "backend", "prefer"}
_TUCKER_KEYS = {"ratio", "rel_tol", "ranks", "n_iter", "backend", "prefer"}
_RULE_KEYS = _MPO_KEYS | _TUCKER_KEYS
_RANK_KEYS = {"ratio", "rel_tol", "max_bond", "ranks"}


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "mpo"
    if isinstance(module, nn.Conv2d):
        return "tucker"
    return None


def _unsupported_kind(module: nn.Module) -> str | None:
    """Why a weight layer that tensorize has no replacement for stays dense (Conv1d, Conv3d, transposed convs), or
    None. They are listed in the report, so that a video model's Conv3d are not left dense without a word."""
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
        return (
            f"{type(module).__name__} has no tensorized replacement (TuckerConv2d replaces nn.Conv2d, MPOLinear "
            "nn.Linear and GPT-2's Conv1D)"
        )
    return None


def _module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name under which it is reachable (shared modules have several)."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            aliases[id(mod)].append(name)
    return aliases


def _param_owners(model: nn.Module) -> dict[int, set[int]]:
    """id(parameter) -> ids of the modules that hold it directly (tied weights have several)."""
    owners: dict[int, set[int]] = defaultdict(set)
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)].add(id(mod))
    return owners


def _match_rules(names: list[str], rules: Mapping[str, Mapping | None] | None, candidates: set[str]):
    """name -> (rule pattern, settings or None). Without rules every candidate is selected with no overrides."""
    if rules is None:
        return {n: ("*", {}) for n in names if n in candidates}
    chosen: dict[str, tuple[str, Mapping | None]] = {}
    for pattern, settings in rules.items():
        if settings is not None:
            if not isinstance(settings, Mapping):
                raise ValueError(
                    f"tensorize: rule {pattern!r} must map to a dict of settings or None, got {settings!r}"
                )
            unknown = set(settings) - _RULE_KEYS
            if unknown:
                raise ValueError(
                    f"tensorize: rule {pattern!r} has unknown settings {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}"
                )
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; run `tnk inspect` to list layer names"
            raise ValueError(f"tensorize: rule {pattern!r} matches no layer of the model{hint}")
        for n in hits:
            chosen.setdefault(n, (pattern, settings))
    return chosen


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and (Distributed)DataParallel's wrappers, whose names carry a prefix
    ("_orig_mod.", "module.") that rules, reports and the skeleton a checkpoint loads into do not have."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def tensorize(
    model: nn.Module,
    *,
    ratio: float | None = None,
    rules: Mapping[str, Mapping | None] | None = None,
    rel_tol: float | None = None,
    num_cores: int | None = None,
    max_bond: int | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> TensorizeReport:
    """Replace layers of `model` in place by tensorized ones and return a report.

    Without `rules`, every nn.Linear / transformers Conv1D and every groups=1 nn.Conv2d is a candidate. With
    `rules` ({fnmatch pattern on qualified names: settings dict or None}), only matching layers are candidates; the
    first matching pattern wins; None leaves the layer dense; a pattern that matches nothing is an error. Settings
    (ratio, rel_tol, max_bond, num_cores, in_modes, out_modes, ranks, n_iter, backend, prefer) override the keyword
    arguments.

    Layers that cannot reach their ratio, grouped convs, Linear layers inside nn.MultiheadAttention (which reads
    their weight directly), layers whose weight an ancestor's code reads (weight_readers.py) and layers whose
    weight is tied to another module (e.g. GPT-2's lm_head and wte) are left dense and reported with the reason.
    A module reachable under several names is converted once and replaced at every name. A model wrapped by
    torch.compile or (Distributed)DataParallel is tensorized inside the wrapper, with names (in rules and the
    report) as they are in the model itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tensorize: model must be a torch.nn.Module, got {type(model).__name__}")
    if rules is not None and not isinstance(rules, Mapping):
        raise TypeError(
            f"tensorize: rules must be a dict {{pattern: settings or None}}, got {type(rules).__name__}; "
            'e.g. {"fc": None, "*": {}}'
        )
    if ratio is not None:
        check_ratio(ratio, "tensorize: ratio")
        if rel_tol is not None or max_bond is not None:
            raise ValueError("tensorize: give either ratio or rel_tol/max_bond, not both")
    if max_bond is not None and (isinstance(max_bond, bool) or not isinstance(max_bond, int) or max_bond < 1):
        raise ValueError(f"tensorize: max_bond must be a positive int, got {max_bond!r}")

    model = unwrapped(model)  # names as the user writes them in rules: without "_orig_mod." or "module."
    aliases = _module_aliases(model)
    owners = _param_owners(model)
    named = dict(model.named_modules())  # first name per module
    names = [n for n in named if n]
    candidates = {n for n in names if _kind(named[n]) is not None}
    other = {n for n in names if _unsupported_kind(named[n]) is not None}  # listed as left dense, never converted
    done = [n for n in names if isinstance(named[n], (MPOLinear, TuckerConv2d))]
    if not candidates and done:  # a second call on the same model (a notebook cell run twice): not a silent no-op
        raise ValueError(
            f"tensorize: the model has no dense Linear / Conv1D / Conv2d layer left; its {len(done)} tensorized "
            f"layers ({', '.join(done[:3])}{', ...' if len(done) > 3 else ''}) were tensorized before. To compress "
            "them further, convert them back first (layer.to_linear() / layer.to_conv())"
        )
    selection = _match_rules(names, rules, candidates | other)
    explicit = set(rules) if rules is not None else set()

    report = TensorizeReport()
    # Layers are swapped in once every one is built: an error at a later layer (a bad rule, a backend the layer
    # kind lacks) left the model half converted. `named` holds every old layer until the end anyway.
    replacements: list[tuple[list[str], nn.Module]] = []
    todo = [n for n in names if n in selection and n in candidates | other]
    unreachable = 0
    iterator = todo
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(todo, desc="tensorize", unit="layer")
    for name in iterator:
        module = named[name]
        pattern, settings = selection[name]
        kind = _kind(module)
        weight = linear_weight(module) if kind == "mpo" else module.weight
        shape = tuple(weight.shape)
        before = weight.numel()

        def skip(reason: str, name=name, shape=shape, before=before) -> None:
            report.rows.append(LayerReport(name, "-", shape, before, before, 1.0, None, 0.0, f"skipped: {reason}"))

        if settings is None:
            skip(f"excluded by rule {pattern!r}")
            continue
        reason = _unsupported_reason(model, name, module, kind, owners)
        if reason:
            if pattern in explicit and not any(c in pattern for c in "*?["):
                raise ValueError(f"tensorize: layer {name!r} cannot be tensorized: {reason}")
            skip(reason)
            continue
        opts = {
            "ratio": ratio,
            "rel_tol": rel_tol,
            "max_bond": max_bond,
            "num_cores": num_cores,
            "backend": backend,
        }
        if _RANK_KEYS & set(settings):
            # A rule that chooses ranks its own way replaces the global rank selection instead of mixing with it.
            opts.update(dict.fromkeys(_RANK_KEYS))
        opts.update(settings)
        t0 = time.perf_counter()
        try:
            new = _build(module, kind, opts)
        except RatioUnreachableError as exc:
            unreachable += 1
            skip(str(exc))
            continue
        except ValueError as exc:
            raise ValueError(f"tensorize: layer {name!r} ({type(module).__name__} {shape}): {exc}") from exc
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            approx = new.to_dense()
            ref = weight.detach()
            err = (
                torch.linalg.norm((approx - ref).double()) / torch.linalg.norm(ref.double()).clamp_min(1e-300)
            ).item()
        new.tensorized_name = name  # named by the error for code that reads its .weight (nn/no_dense_weight.py)
        replacements.append((aliases[id(module)], new))
        after = new.num_weight_params
        structure = f"modes {new.in_modes}x{new.out_modes} bonds {new.bonds}" if kind == "mpo" else f"ranks {new.ranks}"
        report.rows.append(
            LayerReport(name, kind, shape, before, after, before / after, err, seconds, "tensorized", structure)
        )
    if todo and unreachable and not report.tensorized and ratio is not None:
        raise ValueError(
            f"tensorize: ratio {ratio:g} cannot be reached by any selected layer; choose a smaller ratio "
            "(see the per-layer limits with `tnk inspect`)"
        )
    for names_of_layer, new in replacements:
        for alias in names_of_layer:
            _set_submodule(model, alias, new)
    keep_transformer_layers_on_their_regular_path(model)
    if report.tensorized:
        guard_save_pretrained(model)  # from_pretrained would reload it dense and random: hf_save.py
    larger = [r.name for r in report.rows if r.tensorized and r.ratio < 1]
    if larger:  # e.g. tensorize(model) with no ratio: exact full-rank factors hold more weights than the layer
        warnings.warn(
            f"tensorize: {len(larger)} layer(s) now hold more weights than the dense ones they replace "
            f"({', '.join(larger[:3])}{', ...' if len(larger) > 3 else ''}): factors at or near full rank (with no "
            "ratio, tensorize keeps full rank: exact, larger, slower); pass ratio=R, or a larger rel_tol or a "
            "smaller max_bond, to compress",
            stacklevel=2,
        )
    return report


def keep_transformer_layers_on_their_regular_path(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer's inference fast path hands linear1.weight and linear2.weight to one fused kernel,
    and an MPOLinear has no dense weight: a layer whose feed-forward is tensorized must run its regular path, which
    calls the layers (before 2026-12-02 it raised AttributeError in eval mode). The layer's switch is the flag its
    __init__ sets, `activation_relu_or_gelu`, which only the fast path reads; nn.TransformerEncoder's nested-tensor
    path reads the first layer's weights too (`use_nested_tensor`). Also run by load_compressed."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and (
            isinstance(m.linear1, MPOLinear) or isinstance(m.linear2, MPOLinear)
        ):
            m.activation_relu_or_gelu = 0
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            getattr(layer, "activation_relu_or_gelu", 1) == 0 for layer in m.layers
        ):
            m.use_nested_tensor = False


def _unsupported_reason(model: nn.Module, name: str, module: nn.Module, kind: str | None, owners) -> str | None:
    if kind is None:
        return _unsupported_kind(module)
    if kind == "tucker":
        if module.groups != 1:
            return f"grouped conv (groups={module.groups}) is not supported by Tucker-2"
    parent_name = name.rsplit(".", 1)[0] if "." in name else ""
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "inside nn.MultiheadAttention, which reads the weight directly"
    reader = weight_reader(model, name)
    if reader is not None:
        return f"{reader} reads its dense .weight directly, which a tensorized layer does not have"
    shared = owners[id(module.weight)] - {id(module)}
    if shared:
        return "weight is tied to another module (e.g. an embedding); tensorizing it would break the tie"
    return None


def _build(module: nn.Module, kind: str, opts: dict) -> nn.Module:
    if kind == "mpo":
        kwargs = {k: opts.get(k) for k in _MPO_KEYS if opts.get(k) is not None}
        return MPOLinear.from_linear(module, **kwargs)
    kwargs = {k: opts.get(k) for k in _TUCKER_KEYS if opts.get(k) is not None}
    if not {"ranks", "ratio", "rel_tol"} & set(kwargs) and opts.get("max_bond") is not None:
        # A bond cap means the same thing for Tucker ranks: no rank above it.
        cap = opts["max_bond"]
        kwargs["ranks"] = (min(cap, module.out_channels), min(cap, module.in_channels))
    return TuckerConv2d.from_conv(module, **kwargs)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def count_params(model: nn.Module) -> int:
    """Unique parameters of a model (tied parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["tensorize", "count_params", "LayerReport", "TensorizeReport"]

"""Whether a ratio can be reached by every layer of the slices, and the ratio a run actually achieved.

`tnk compress --ratio R` on a ResNet refuses, before the teacher is trained, a ratio that some sliced conv cannot
reach even at Tucker ranks (1, 1) (such a layer would stay dense and the student would not be compressed as asked):
the check needs only the layers' shapes, so it runs on the architecture built on the meta device. `distill()` does
the same after decomposing (which also covers Linear layers). The achieved ratio counts every sliced layer, a
layer left dense at 1x.
"""

from __future__ import annotations

import math

from torch import nn

import tnkernels


def conv_limit(shape) -> float:
    """The largest ratio a Tucker-2 decomposition of a conv weight of `shape` reaches (ranks (1, 1))."""
    return math.prod(shape) / tnkernels.tucker_num_params(shape, (1, 1))


def _sliced_layers(model: nn.Module, specs):
    for spec in specs:
        for root in spec.modules:
            for name, m in model.get_submodule(root).named_modules():
                yield (f"{root}.{name}" if name else root), m


def unreachable_convs(model: nn.Module, specs, ratio: float) -> tuple[list[tuple[str, tuple, float]], float]:
    """([(name, weight shape, limit)] of the sliced convs that cannot reach `ratio`, the smallest limit)."""
    limits = [
        (name, tuple(m.weight.shape), conv_limit(tuple(m.weight.shape)))
        for name, m in _sliced_layers(model, specs)
        if isinstance(m, nn.Conv2d) and m.groups == 1
    ]
    return [r for r in limits if r[2] < ratio], min((r[2] for r in limits), default=math.inf)


def refuse_unreachable(ratio: float, bad: list[tuple[str, tuple, float]], best: float) -> None:
    """Raise the ValueError naming the layers that cannot reach `ratio` (nothing when `bad` is empty)."""
    if not bad:
        return
    shown = ", ".join(
        f"{n} {list(s)} " + (f"at most {lim:.1f}x" if lim else "(limit: tnk inspect)") for n, s, lim in bad[:6]
    )
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    hint = ""
    if math.isfinite(best) and best > 1:
        hint = f"use --ratio {math.floor(best * 10) / 10:g} or less (the largest every sliced layer reaches), or "
    raise ValueError(
        f"--ratio {ratio:g} cannot be reached by {len(bad)} sliced layer(s): {shown}{more}; they would stay dense; "
        f"{hint}--slices without them, or per-layer ratios with --budget"
    )


def check_ratio_on_meta(model: nn.Module, specs, ratio: float | None) -> None:
    """The up-front check of `tnk compress --ratio` (shapes only: `model` may live on the meta device)."""
    if ratio is not None:
        refuse_unreachable(ratio, *unreachable_convs(model, specs, ratio))


def sliced_weight_counts(teacher: nn.Module, student: nn.Module, specs) -> tuple[int, int, int]:
    """(dense weights, student weights, layers left dense) over every Conv2d / Linear of the slices (bias
    excluded, as in tnkernels' ratio): a layer the student keeps dense counts at 1x."""
    before = after = dense = 0
    for name, m in _sliced_layers(teacher, specs):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        new = student.get_submodule(name)
        before += m.weight.numel()
        if hasattr(new, "num_weight_params"):
            after += int(new.num_weight_params)
        else:
            after += m.weight.numel()
            dense += 1
    return before, after, dense

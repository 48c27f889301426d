"""Rank budget: spread a global compression target across layers using a sensitivity table.

Each layer has a menu of options: stay dense (loss 0) or one of the scanned ratios, each with the parameter
count the tensorization really produced and a predicted loss (metric drop when only that layer is
compressed, from distill/sensitivity.py). Losses are assumed additive across layers, which is the usual
first-order model.

The allocator minimizes the summed predicted loss subject to

    sum(dense params of the selected layers) / sum(params after) >= target_ratio

It is a multiple-choice knapsack, solved two ways and the better feasible answer kept:

1. Dynamic programming over the parameter budget split into _DP_UNITS units, each option's cost rounded *up*
   to whole units, so every answer it gives really fits. It finds the exact optimum of any budget at most
   n_layers units tighter than the real one (the rounding costs at most one unit per layer).
2. Greedy: for each layer keep the lower convex hull of its (saved parameters, loss) points and take the
   cheapest upgrade in loss per saved parameter across all layers until the target is met (optimal for the
   fractional relaxation); then a repair pass spends the overshoot by moving layers back to less-compressed
   options while the target still holds. It covers targets so tight that the DP's rounding makes them look
   unreachable.

Layers that stay dense get a ``None`` rule (tensorize skips them).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_write_json, read_json
from .sensitivity import SensitivityTable, layer_rule_pattern

_FORMAT = "tnkernels.budget/1"
DENSE = 1.0  # the "ratio" of a layer left uncompressed
_DP_UNITS = 4096  # budget resolution of the knapsack DP; tests use it to bound the DP's rounding loss

Option = tuple[float, int, float]  # (nominal ratio, parameters after, predicted loss)


def _layer_options(table: SensitivityTable, name: str, dense: int) -> list[Option]:
    """(ratio, params_after, loss) options of one layer, dense first; params rescaled if `dense` differs."""
    opts = [(DENSE, dense, 0.0)]
    table_dense = table.params_dense[name]
    for r, p_after, loss in table.options(name):
        # A caller-supplied count (a layer resized since the scan) keeps the measured achieved ratio.
        p = p_after if dense == table_dense else max(1, round(dense * p_after / table_dense))
        if p < dense:
            opts.append((r, p, loss))
    return opts


def _lower_hull(opts: list[Option]) -> list[Option]:
    """Options on the lower convex hull of (saved params, loss), from dense to the most compressed.

    Dominated options (more params and no less loss than another) never appear, and the slopes between
    consecutive hull points increase, so taking upgrades in slope order is the greedy-optimal sequence.
    """
    dense = opts[0][1]
    best: dict[int, Option] = {}
    for o in opts:  # for equal parameter counts keep the smallest loss
        if o[1] not in best or o[2] < best[o[1]][2]:
            best[o[1]] = o
    pts = sorted(best.values(), key=lambda o: dense - o[1])  # by saved params ascending
    hull: list[Option] = []
    for o in pts:
        while len(hull) >= 2:
            (_, p1, l1), (_, p2, l2) = hull[-2], hull[-1]
            s1, s2, s3 = dense - p1, dense - p2, dense - o[1]
            # drop hull[-1] if it lies on or above the segment hull[-2] -> o
            if (l2 - l1) * (s3 - s1) >= (o[2] - l1) * (s2 - s1):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def _greedy(names: list[str], options: dict[str, list[Option]], budget: float) -> dict[str, Option]:
    """Convex-hull greedy by marginal loss per saved parameter, then repair; always feasible if reachable."""
    hulls = {n: _lower_hull(options[n]) for n in names}
    pos = dict.fromkeys(names, 0)
    used = float(sum(options[n][0][1] for n in names))
    heap: list[tuple[float, int, str]] = []

    def push(i: int, n: str) -> None:
        h, k = hulls[n], pos[n]
        if k + 1 < len(h):
            heapq.heappush(heap, ((h[k + 1][2] - h[k][2]) / (h[k][1] - h[k + 1][1]), i, n))

    for i, n in enumerate(names):
        push(i, n)
    while used > budget and heap:
        _, i, n = heapq.heappop(heap)
        k = pos[n]
        used -= hulls[n][k][1] - hulls[n][k + 1][1]
        pos[n] = k + 1
        push(i, n)
    choice = {n: hulls[n][pos[n]] for n in names}

    # Repair: spend any overshoot on the largest loss reduction that keeps the target, until none is left.
    while True:
        slack = budget - sum(o[1] for o in choice.values())
        best = None
        for n in names:
            cur = choice[n]
            for o in options[n]:
                gain = cur[2] - o[2]
                if gain > 1e-15 and o[1] - cur[1] <= slack and (best is None or gain > best[0]):
                    best = (gain, n, o)
        if best is None:
            return choice
        choice[best[1]] = best[2]


def _knapsack_dp(names: list[str], options: dict[str, list[Option]], budget: float) -> dict[str, Option] | None:
    """Exact multiple-choice knapsack on a budget grid with costs rounded up (so the answer is feasible)."""
    unit = budget / _DP_UNITS
    best = np.full(_DP_UNITS + 1, np.inf)  # best[c]: least loss using exactly c units so far
    best[0] = 0.0
    back = []
    for n in names:
        new = np.full_like(best, np.inf)
        arg = np.full(best.shape, -1, dtype=np.int64)
        for k, (_, p, l) in enumerate(options[n]):
            c = math.ceil(p / unit)
            if c > _DP_UNITS:
                continue
            cand = np.full_like(best, np.inf)
            cand[c:] = best[: _DP_UNITS + 1 - c] + l
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        back.append(arg)
        best = new
    if not np.isfinite(best).any():
        return None
    c = int(np.argmin(best))
    choice = {}
    for n, arg in zip(reversed(names), reversed(back), strict=True):
        o = options[n][int(arg[c])]
        choice[n] = o
        c -= math.ceil(o[1] / unit)
    return choice


def allocate_ratios(
    table: SensitivityTable,
    target_ratio: float,
    *,
    param_counts: Mapping[str, int] | None = None,
    layers: list[str] | None = None,
) -> dict[str, float]:
    """Choose a ratio per layer (1.0 = leave dense) that reaches `target_ratio` with the least predicted loss.

    Args:
        table: a sensitivity table (distill.sensitivity.sensitivity_scan or SensitivityTable.from_json).
        target_ratio: dense params / compressed params over the selected layers' weights; must be >= 1.
        param_counts: dense weight parameters per layer; defaults to the counts recorded in the table.
        layers: the subset of the table's layers to budget over (default: all of them).

    Returns:
        {layer name: ratio}, with ratio one of the table's scanned ratios or 1.0 for a layer left dense. The
        achieved ratio (``summarize_allocation``) is >= target_ratio.

    Raises:
        ValueError: if target_ratio < 1 or not finite, a layer lacks a parameter count, or no combination of
            the scanned ratios reaches the target (the message gives the largest reachable ratio).
    """
    if not isinstance(table, SensitivityTable):
        raise TypeError(f"allocate_ratios: table must be a SensitivityTable, got {type(table).__name__}")
    target = float(target_ratio)
    if not math.isfinite(target) or target < 1.0:
        raise ValueError(f"allocate_ratios: target_ratio must be a finite number >= 1, got {target_ratio!r}")
    names = list(table.layers if layers is None else layers)
    if not names:
        raise ValueError("allocate_ratios: no layers to budget over")
    unknown = [n for n in names if n not in table.layers]
    if unknown:
        raise ValueError(f"allocate_ratios: layers {unknown} are not in the sensitivity table; rescan or drop them")
    counts = dict(table.params_dense) if param_counts is None else dict(param_counts)
    missing = [n for n in names if n not in counts]
    if missing:
        raise ValueError(f"allocate_ratios: param_counts lacks layers {missing}")
    bad = [n for n in names if not isinstance(counts[n], int) or counts[n] <= 0]
    if bad:
        raise ValueError(f"allocate_ratios: param_counts must be positive integers; bad for {bad}")

    options = {n: _layer_options(table, n, counts[n]) for n in names}
    total = sum(counts[n] for n in names)
    budget = total / target  # params allowed after compression
    smallest = sum(min(o[1] for o in options[n]) for n in names)
    if smallest > budget:
        raise ValueError(
            f"allocate_ratios: target_ratio {target:g} is unreachable with the scanned ratios; the most "
            f"compression any allocation reaches is {total / smallest:.3f}x. Scan higher ratios "
            f"(sensitivity_scan(..., ratios=[..., {2 * max(table.ratios):g}])) or include more layers."
        )

    picks = [
        c
        for c in (_knapsack_dp(names, options, budget), _greedy(names, options, budget))
        if c is not None and sum(o[1] for o in c.values()) <= budget
    ]
    # Both are feasible by construction (the filter only guards that); keep the lower predicted loss, then the
    # one that compresses less.
    choice = min(picks, key=lambda c: (sum(o[2] for o in c.values()), -sum(o[1] for o in c.values())))
    return {n: float(choice[n][0]) for n in names}


def summarize_allocation(
    table: SensitivityTable, allocation: Mapping[str, float], *, param_counts: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Achieved ratio, parameter totals and predicted loss of an allocation (as the allocator models them)."""
    counts = dict(table.params_dense) if param_counts is None else dict(param_counts)
    before = after = 0
    loss = 0.0
    for n, r in allocation.items():
        opts = {round(o[0], 9): o for o in _layer_options(table, n, counts[n])}
        if round(float(r), 9) not in opts:
            raise ValueError(f"summarize_allocation: layer {n!r} has no measured option at ratio {r}")
        _, p, l = opts[round(float(r), 9)]
        before += counts[n]
        after += p
        loss += l
    return {
        "achieved_ratio": before / after if after else float("inf"),
        "params_before": before,
        "params_after": after,
        "predicted_loss": loss,
        "layers_dense": sum(1 for r in allocation.values() if r == DENSE),
    }


def save_budget(path: str | Path, allocation: Mapping[str, float], meta: Mapping[str, Any] | None = None) -> Path:
    """Write an allocation (and free-form JSON-able metadata, e.g. the target and summary) atomically."""
    alloc = {}
    for n, r in allocation.items():
        r = float(r)
        if not math.isfinite(r) or r < 1.0:
            raise ValueError(f"save_budget: ratio for layer {n!r} must be finite and >= 1, got {r}")
        alloc[str(n)] = r
    if not alloc:
        raise ValueError("save_budget: allocation is empty")
    payload = {
        "format": _FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "allocation": alloc,
        "meta": dict(meta or {}),
    }
    try:
        return atomic_write_json(path, payload)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_budget: meta must be JSON-serializable without NaN/inf ({e})") from e


def load_budget(path: str | Path) -> dict[str, dict[str, float] | None]:
    """Read a budget file and return ``tnkernels.tensorize`` rules: {pattern: {"ratio": r} or None (dense)}.

    Patterns match exactly one qualified module name each (fnmatch special characters are escaped).
    """
    d = read_json(path, "load_budget")
    if not isinstance(d, dict) or d.get("format") != _FORMAT or not isinstance(d.get("allocation"), dict):
        raise ValueError(
            f"load_budget: {str(path)!r} is not a budget file (expected format {_FORMAT!r}); "
            f"create one with distill.budget.save_budget"
        )
    rules: dict[str, dict[str, float] | None] = {}
    for n, r in d["allocation"].items():
        if not isinstance(r, int | float) or not math.isfinite(r) or r < 1.0:
            raise ValueError(f"load_budget: {str(path)!r}: ratio for layer {n!r} must be a number >= 1, got {r!r}")
        rules[layer_rule_pattern(n)] = None if r == DENSE else {"ratio": float(r)}
    return rules


def load_budget_meta(path: str | Path) -> dict[str, Any]:
    """The metadata stored with a budget (empty dict if none)."""
    d = read_json(path, "load_budget_meta")
    return dict(d.get("meta", {})) if isinstance(d, dict) else {}

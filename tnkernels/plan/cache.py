"""Per-key plan cache and the planner's run-time options (recompute, forced plan kind, cached dense weights).

The key is made of static facts only (core shapes, row count, dtype, device, whether a gradient is needed and
the options), so a forward pays one dict lookup and never searches. Under torch.compile the lookups run at trace
time (assume_constant_result below); the options are plain module globals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .calibrate import get_calibration
from .mpo import MPODecision, decide
from .tucker import TuckerDecision, decide_tucker

_MPO_PLANS: dict[tuple, MPODecision] = {}
_TUCKER_PLANS: dict[tuple, TuckerDecision] = {}
_STATS = {"searches": 0, "lookups": 0}
# Bumped whenever a cached decision may stop holding (plans cleared, options changed): callers that memoize what
# a decision implied (MPOLinear's inference routes) compare it instead of re-deriving the decision per call.
_GENERATION = [0]


def plan_generation() -> int:
    return _GENERATION[0]


class _Options:
    """Module-level switches. Plain attributes (not a contextvar) so that dynamo can guard on them."""

    recompute: bool = False  # backward recomputes intermediate states instead of saving them
    force: str | None = None  # force a plan kind (tests, benchmarks)
    tucker_force: str | None = None
    fold: bool | None = None  # force every sweep step folded (True) or batched (False); None: the planner picks
    cache_dense: bool = False  # inference: keep rebuilt dense weights of layers whose chain costs more than dense


OPTIONS = _Options()


def clear_plans() -> None:
    """Forget every cached plan (after recalibration or a change of options)."""
    _GENERATION[0] += 1
    _MPO_PLANS.clear()
    _TUCKER_PLANS.clear()


def plan_stats() -> dict[str, int]:
    """How many plan lookups and how many searches happened (a search is a cache miss)."""
    return dict(_STATS)


# Under torch.compile a size may be symbolic (automatic dynamic shapes, dynamic=True). Plans are then made for
# buckets of sizes, powers of 4: the comparisons below guard only on the bucket's range, so a dynamic size costs
# one graph per bucket, never one per value, and the plan made for the bucket's top size runs correctly at any size
# in it (the executors read sizes from the tensors). torch.export must not narrow a dynamic dimension's range at
# all, so there a size is planned at a fixed representative (`export_size`). Eager calls plan for the exact size.
_BUCKET_TOP = 4**8  # 65536: larger sizes share the last bucket


def planned_size(n, export_size: int | None) -> int:
    """The size to plan a call of size `n` for: n in eager mode, its bucket's top under torch.compile,
    `export_size` under torch.export (its bucket there too when None: for sizes that must stay static)."""
    if not torch.compiler.is_compiling():
        return n
    if export_size is not None and torch.compiler.is_exporting():
        return export_size
    top = 1
    while top < _BUCKET_TOP and n > top:
        top *= 4
    return top


EXPORT_ROWS = 64  # an MPO call's row count under torch.export


def planned_rows(rows) -> int:
    """planned_size for an MPO call's row count (also what its per-call choices compare with bounds)."""
    return planned_size(rows, EXPORT_ROWS)


# Both decisions are constants to torch.compile: dynamo calls them at trace time, as plain Python, and keeps the
# result, so a first call made under compile (fullgraph too) can search and calibrate. Callers pass plain ints
# (planned_size).
@torch.compiler.assume_constant_result
def mpo_decision(
    shapes: tuple[tuple[int, int, int, int], ...],
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
    needs_grad: bool,
) -> MPODecision:
    """The cached decision for this key; searches (once) on a miss."""
    opts = (OPTIONS.recompute, OPTIONS.force, OPTIONS.fold)
    key = (shapes, rows, dtype, device.type, device.index, needs_grad, opts)
    _STATS["lookups"] += 1
    hit = _MPO_PLANS.get(key)
    if hit is not None:
        return hit
    _STATS["searches"] += 1
    generation = _GENERATION[0]
    cal = get_calibration(device, dtype)
    dec = decide(
        cal,
        shapes,
        rows,
        dtype.itemsize,
        needs_grad=needs_grad,
        recompute=OPTIONS.recompute,
        force=OPTIONS.force,
        force_fold=OPTIONS.fold,
    )
    _store_unless_stale(_MPO_PLANS, key, dec, generation)
    return dec


@torch.compiler.assume_constant_result
def tucker_decision(
    key_shapes: tuple,
    conv: tuple,
    dtype: torch.dtype,
    device: torch.device,
    needs_grad: bool,
) -> TuckerDecision:
    key = (key_shapes, conv, dtype, device.type, device.index, needs_grad, OPTIONS.tucker_force)
    _STATS["lookups"] += 1
    hit = _TUCKER_PLANS.get(key)
    if hit is not None:
        return hit
    _STATS["searches"] += 1
    generation = _GENERATION[0]
    cal = get_calibration(device, dtype)
    dec = decide_tucker(cal, key_shapes, conv, dtype.itemsize, needs_grad=needs_grad, force=OPTIONS.tucker_force)
    _store_unless_stale(_TUCKER_PLANS, key, dec, generation)
    return dec


def _store_unless_stale(plans: dict, key: tuple, dec, generation: int) -> None:
    """Keep `dec` unless the plans were cleared while it was searched (recalibrate() or thin_bounds.use() in another
    thread): it was made with the old constants, and stored after the clear it would stay for good. The caller
    still runs it; the next call searches again."""
    if _GENERATION[0] == generation:
        plans[key] = dec


@contextlib.contextmanager
def options(
    *,
    recompute: bool | None = None,
    force: str | None | type[Ellipsis] = ...,
    tucker_force: str | None | type[Ellipsis] = ...,
    cache_dense: bool | None = None,
    fold: bool | None | type[Ellipsis] = ...,
) -> Iterator[None]:
    """Temporarily change planner options, e.g. `with options(recompute=True): loss.backward()`.

    recompute: the backward recomputes the forward's intermediate states instead of keeping them (saves
    memory).
    force: run this MPO plan kind ("sweep-left", "sweep-right", "merge", "rebuild", "einsum") regardless of
    cost.
    tucker_force: run this Tucker plan kind ("three-convs", "fold-in", "fold-out", "dense").
    cache_dense: in no-grad calls, keep the rebuilt dense weight of layers whose chain costs more than dense.
    fold: run every sweep step as a folded GEMM (True) or a batched matmul (False); None: the planner picks.
    """
    saved = (OPTIONS.recompute, OPTIONS.force, OPTIONS.tucker_force, OPTIONS.cache_dense, OPTIONS.fold)
    try:
        set_options(recompute=recompute, force=force, tucker_force=tucker_force, cache_dense=cache_dense, fold=fold)
        yield
    finally:
        OPTIONS.recompute, OPTIONS.force, OPTIONS.tucker_force, OPTIONS.cache_dense, OPTIONS.fold = saved
        _GENERATION[0] += 1


def set_options(
    *,
    recompute: bool | None = None,
    force: str | None | type[Ellipsis] = ...,
    tucker_force: str | None | type[Ellipsis] = ...,
    cache_dense: bool | None = None,
    fold: bool | None | type[Ellipsis] = ...,
) -> None:
    """Set planner options for the rest of the process (arguments left out keep their value)."""
    from .mpo import PLAN_KINDS
    from .tucker import TUCKER_KINDS

    for name, value in (("recompute", recompute), ("cache_dense", cache_dense), ("fold", fold)):
        if value is not None and value is not ... and not isinstance(value, bool):  # bool("no") is True
            raise ValueError(f"plan options: {name} must be True, False or None, got {value!r}")
    if force is not ... and force is not None and force not in PLAN_KINDS:
        raise ValueError(f"plan options: force must be one of {', '.join(PLAN_KINDS)} or None, got {force!r}")
    if tucker_force is not ... and tucker_force is not None and tucker_force not in TUCKER_KINDS:
        raise ValueError(
            f"plan options: tucker_force must be one of {', '.join(TUCKER_KINDS)} or None, got {tucker_force!r}"
        )
    _GENERATION[0] += 1
    if recompute is not None:
        OPTIONS.recompute = bool(recompute)
    if force is not ...:
        OPTIONS.force = force  # type: ignore[assignment]
    if tucker_force is not ...:
        OPTIONS.tucker_force = tucker_force  # type: ignore[assignment]
    if cache_dense is not None:
        OPTIONS.cache_dense = bool(cache_dense)
    if fold is not ...:
        OPTIONS.fold = None if fold is None else bool(fold)

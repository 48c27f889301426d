"""Contraction plans for an MPO chain applied to a batch of rows: candidates, their cost, and the choice.

Every "grouped" plan cuts the chain into contiguous groups, merges the cores of each group into one core, then
sweeps the batch through the merged cores from the left or from the right. This one family covers:

    all groups of one core  -> "sweep-left" / "sweep-right"
    1 < groups < cores      -> "merge" (merge sub-chains first, then sweep)
    one group               -> "rebuild" (rebuild the dense weight, then one GEMM)

On top come opt_einsum's "optimal" and "dp" paths over the whole network (forward only; their backward uses
the
best grouped plan). The layouts the executor uses (tnkernels/ops/mpo/torch_impl.py) are fixed so that no step
permutes the batch-sized state:

    left:  state[b·J_before, r·I_g, I_after]   <- merged core as [J_g·r', r·I_g]   (a reshape of the core)
    right: state[b·I_before, I_g·r', J_after]  <- merged core as [r·J_g, I_g·r']   (a small permuted copy of
    the core)

A step whose last state dimension is 1 runs as one plain GEMM with the batch folded into M; the others run as
a
broadcast batched matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .calibrate import Calibration
from .cost import Step, price, total

CoreShape = tuple[int, int, int, int]
_CACHE_LINE = 64  # bytes
PLAN_KINDS = ("sweep-left", "sweep-right", "merge", "rebuild", "einsum")
# Beyond this many cores the 2^(N-1) groupings are sampled down to sweeps, pairs and the rebuild.
_MAX_FULL_ENUMERATION = 10


@dataclass(frozen=True)
class MPOPlan:
    """One way to run the chain. `groups` are half-open core ranges; `direction` is "left" or "right"."""

    kind: str
    direction: str
    groups: tuple[tuple[int, int], ...]
    steps: tuple[Step, ...]
    einsum_eq: str = ""
    einsum_path: tuple = ()
    optimize: str = ""
    folds: tuple[bool, ...] = ()  # per sweep step: folded GEMM (True) or batched matmul (False)
    # einsum plans: (operand positions to pop, pairwise equation) per contraction, executed with torch.einsum so
    # that nothing of opt_einsum runs at call time (dynamo cannot trace it)
    einsum_steps: tuple[tuple[tuple[int, ...], str], ...] = ()

    @property
    def flops(self) -> float:
        return total(self.steps)[0]

    @property
    def bytes(self) -> float:
        return total(self.steps)[1]

    @property
    def seconds(self) -> float:
        return total(self.steps)[2]

    @property
    def label(self) -> str:
        if self.kind == "einsum":
            return f"einsum-{self.optimize}"
        if self.kind == "merge":
            cuts = "|".join(f"{a}:{b}" for a, b in self.groups)
            return f"merge[{cuts}]-{self.direction}"
        return self.kind


@dataclass(frozen=True)
class MPODecision:
    """What the executor runs for one key, plus what explain() prints."""

    forward: MPOPlan
    backward: MPOPlan | None  # None when no gradient is needed
    save_states: bool  # backward reuses the forward's intermediate states (else it recomputes them)
    fwd_seconds: float
    bwd_seconds: float
    saved_bytes: int  # memory held between forward and backward beyond x and the cores
    dense_bytes: int  # memory a cached dense weight would cost (cache_dense mode)
    dense_seconds: float  # predicted time of one dense GEMM of the same layer
    alternatives: tuple[tuple[str, float], ...] = field(default=())  # (label, predicted fwd seconds), best first
    rows: int = 0
    shapes: tuple[CoreShape, ...] = ()


def _prod(xs) -> int:
    return math.prod(int(v) for v in xs)


def merged_shape(shapes: tuple[CoreShape, ...], a: int, b: int) -> CoreShape:
    return (
        shapes[a][0],
        _prod(s[1] for s in shapes[a:b]),
        _prod(s[2] for s in shapes[a:b]),
        shapes[b - 1][3],
    )


def merge_steps(cal: Calibration, shapes, a: int, b: int, isz: int) -> list[Step]:
    """Steps that merge cores a..b-1 left to right: P[r0, Ip, Jp, r] x G[r, i, j, r'] then a permute copy."""
    steps = []
    r0, ip, jp, r = shapes[a]
    for k in range(a + 1, b):
        _, i, j, r1 = shapes[k]
        m, kk, n = r0 * ip * jp, r, i * j * r1
        out = m * n
        # The permute swaps jp and i but moves contiguous runs of j·r1 elements: with runs of a cache line or
        # more it streams like a plain copy; shorter runs make it a strided copy.
        strided = j * r1 * isz < _CACHE_LINE
        steps.append(
            price(
                cal,
                f"merge G{a + 1}..G{k} x G{k + 1}: [{m}, {kk}] @ [{kk}, {n}] + permute",
                2 * m * kk * n,
                isz * (m * kk + kk * n + out + (0 if strided else 2 * out)),
                (m, kk, n),
                ops=2,
                fresh=(isz * out, isz * out),
                permuted=2 * isz * out if strided else 0,
            )
        )
        ip, jp, r = ip * i, jp * j, r1
    return steps


def merge_backward_steps(cal: Calibration, shapes, a: int, b: int, isz: int) -> list[Step]:
    steps = []
    r0, ip, jp, r = shapes[a]
    for k in range(a + 1, b):
        _, i, j, r1 = shapes[k]
        m, kk, n = r0 * ip * jp, r, i * j * r1
        steps.append(
            price(
                cal,
                f"merge backward G{k + 1}: permute + 2 GEMMs",
                4 * m * kk * n,
                isz * (3 * m * n + 2 * (m * kk + kk * n)),
                (m, kk, n),
                ops=3,
            )
        )
        ip, jp, r = ip * i, jp * j, r1
    return steps


def sweep_dims(shapes, groups, direction: str, rows: int) -> list[tuple[int, int, int, int]]:
    """(B', M, K, N) of each sweep step in execution order: out[B', M, N] = core[M, K] @ state[B', K, N]."""
    merged = [merged_shape(shapes, a, b) for a, b in groups]
    dims = []
    if direction == "left":
        j_before = 1
        i_after = _prod(m[1] for m in merged)
        for r0, ig, jg, r1 in merged:
            i_after //= ig
            dims.append((rows * j_before, jg * r1, r0 * ig, i_after))
            j_before *= jg
    else:
        i_before = _prod(m[1] for m in merged)
        j_after = 1
        for r0, ig, jg, r1 in reversed(merged):
            i_before //= ig
            dims.append((rows * i_before, r0 * jg, ig * r1, j_after))
            j_after *= jg
    return dims


def _price_step(cal: Calibration, s: int, dims, isz: int, direction: str, fold: bool) -> Step:
    bp, m, k, n = dims
    extra_ops, extra_bytes = (1, 2 * m * k * isz) if direction == "right" else (0, 0)
    base = isz * (bp * k * n + m * k + bp * m * n) + extra_bytes
    if fold:
        # copy the state to [B'·N, K], one GEMM with the batch folded into M, and the next step's reshape
        # copies the [B', N, M] result back: two extra passes over the state buy one fat GEMM.
        return price(
            cal,
            f"step {s + 1} (folded): [{bp}*{n}, {k}] @ [{k}, {m}] + 2 copies",
            2 * bp * m * k * n,
            base,
            (bp * n, k, m),
            ops=3 + extra_ops,
            fresh=(isz * bp * k * n, isz * bp * m * n, isz * bp * m * n),
            permuted=2 * isz * (bp * k * n + bp * m * n),  # both copies transpose the last two dimensions
        )
    return price(
        cal,
        f"step {s + 1}: state[{bp}, {k}, {n}] <- core[{m}, {k}] -> [{bp}, {m}, {n}]",
        2 * bp * m * k * n,
        base,
        (bp, k, m) if n == 1 else (m, k, n),
        ops=1 + extra_ops,
        fresh=(isz * bp * m * n,),
        batched=n > 1 and bp > 1,
    )


def sweep_steps(
    cal: Calibration, shapes, groups, direction: str, rows: int, isz: int, force_fold: bool | None = None
) -> tuple[list[Step], tuple[bool, ...]]:
    """Merge and sweep steps of a grouped plan, with each step's choice: batched matmul or folded GEMM."""
    steps = []
    for a, b in groups:
        steps += merge_steps(cal, shapes, a, b, isz)
    folds = []
    for s, dims in enumerate(sweep_dims(shapes, groups, direction, rows)):
        plain = _price_step(cal, s, dims, isz, direction, False)
        folded = _price_step(cal, s, dims, isz, direction, True) if dims[3] > 1 else None
        fold = folded is not None and (folded.seconds < plain.seconds if force_fold is None else force_fold)
        steps.append(folded if fold else plain)
        folds.append(fold)
    return steps, tuple(folds)


def sweep_backward_steps(
    cal: Calibration, shapes, groups, direction: str, rows: int, isz: int, folds: tuple[bool, ...] = ()
) -> list[Step]:
    steps = []
    dims = sweep_dims(shapes, groups, direction, rows)
    for s in reversed(range(len(dims))):
        bp, m, k, n = dims[s]
        fold = bool(folds and folds[s])
        # d_core is one GEMM over B'·N either way (tensordot permutes both operands first when N > 1)
        copies = 0 if n == 1 else 2 * (bp * m * n + bp * k * n)
        steps.append(
            price(
                cal,
                f"step {s + 1} backward: d_core [{m}, {k}] over {bp * n}",
                2 * bp * m * k * n,
                isz * (bp * k * n + m * k + bp * m * n),
                (m, bp * n, k),
                ops=2,
                fresh=(isz * bp * m * n, isz * bp * k * n) if n > 1 else (),
                permuted=isz * copies,
            )
        )
        mind = (bp * n, m, k) if (fold or n == 1) else (k, m, n)
        steps.append(
            price(
                cal,
                f"step {s + 1} backward: d_state [{bp}, {k}, {n}]",
                2 * bp * m * k * n,
                isz * (bp * k * n + m * k + bp * m * n),
                mind,
                ops=1,
                fresh=(isz * bp * k * n,),
                batched=not (fold or n == 1) and bp > 1,
            )
        )
    for a, b in groups:
        steps += merge_backward_steps(cal, shapes, a, b, isz)
    return steps


def saved_state_elems(shapes, groups, direction: str, rows: int) -> int:
    """Elements of the intermediate states a saving backward keeps (the first state is x itself)."""
    dims = sweep_dims(shapes, groups, direction, rows)
    states = sum(bp * k * n for bp, _, k, n in dims[1:])
    merged = sum(_prod(merged_shape(shapes, a, b)) for a, b in groups if b - a > 1)
    return states + merged


def _kind(groups, direction: str, n_cores: int) -> str:
    if len(groups) == 1:
        return "rebuild"
    if len(groups) == n_cores:
        return f"sweep-{direction}"
    return "merge"


def groupings(n: int) -> list[tuple[tuple[int, int], ...]]:
    """Every cut of n cores into contiguous groups (2^(n-1) of them; sampled down for very long chains)."""
    out = []
    if n <= _MAX_FULL_ENUMERATION:
        masks = range(1 << (n - 1))
    else:  # singletons, one cut anywhere, and the whole chain
        masks = [(1 << (n - 1)) - 1] + [1 << c for c in range(n - 1)] + [0]
    for mask in masks:
        cuts = [0] + [c + 1 for c in range(n - 1) if mask >> c & 1] + [n]
        out.append(tuple(zip(cuts, cuts[1:], strict=False)))
    return out


def grouped_plans(cal: Calibration, shapes, rows: int, isz: int, force_fold: bool | None = None) -> list[MPOPlan]:
    plans = []
    n = len(shapes)
    for groups in groupings(n):
        for direction in ("left", "right") if len(groups) > 1 else ("left",):
            steps, folds = sweep_steps(cal, shapes, groups, direction, rows, isz, force_fold)
            plans.append(MPOPlan(_kind(groups, direction, n), direction, groups, tuple(steps), folds=folds))
    return plans


def _einsum_equation(shapes) -> str:
    letters = iter("acdefghklmnopqstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    ins = [next(letters) for _ in shapes]
    outs = [next(letters) for _ in shapes]
    bonds = [next(letters) for _ in range(len(shapes) - 1)]
    terms = ["b" + "".join(ins)]
    for k in range(len(shapes)):
        left = bonds[k - 1] if k > 0 else ""
        right = bonds[k] if k < len(shapes) - 1 else ""
        terms.append(left + ins[k] + outs[k] + right)
    return ",".join(terms) + "->b" + "".join(outs)


def einsum_operand_shapes(shapes, rows: int) -> list[tuple[int, ...]]:
    """Shapes the einsum plan's operands are viewed as (boundary bonds of size 1 squeezed away)."""
    ops = [(rows, *(s[1] for s in shapes))]
    n = len(shapes)
    for k, (r0, i, j, r1) in enumerate(shapes):
        ops.append(((r0,) if k > 0 else ()) + (i, j) + ((r1,) if k < n - 1 else ()))
    return ops


def einsum_plans(cal: Calibration, shapes, rows: int, isz: int) -> list[MPOPlan]:
    """opt_einsum's optimal (short chains only: it is exponential) and dynamic-programming paths."""
    try:
        import opt_einsum
    except ImportError:  # opt_einsum is a dependency, but a missing one only removes candidates
        return []
    if len(shapes) + 1 > 52:  # more operands than einsum letters
        return []
    eq = _einsum_equation(shapes)
    operand_shapes = einsum_operand_shapes(shapes, rows)
    plans = []
    for optimize in ("optimal", "dp") if len(shapes) <= 6 else ("dp",):
        path, info = opt_einsum.contract_path(eq, *operand_shapes, shapes=True, optimize=optimize)
        sizes = info.size_dict
        steps = []
        for c in info.contraction_list:
            idx_removed, sub = c[1], c[2]
            lhs, out = sub.split("->")
            parts = lhs.split(",")
            kk = _prod(sizes[x] for x in idx_removed) if idx_removed else 1
            if len(parts) == 2:
                a, b = set(parts[0]), set(parts[1])
                m = _prod(sizes[x] for x in a - b)
                n = _prod(sizes[x] for x in b - a)
                batch = _prod(sizes[x] for x in (a & b) - set(idx_removed))
                flops = 2 * batch * m * n * kk
                mind = (m, kk, n)
                is_bmm = batch > 1
            else:
                flops = 2 * _prod(sizes[x] for x in set(lhs) - {","})
                mind = 1
                is_bmm = False
            part_sizes = [isz * _prod(sizes[x] for x in p) for p in parts]
            out_size = isz * _prod(sizes[x] for x in out)
            nbytes = sum(part_sizes) + out_size
            # torch.einsum permutes its operands into a bmm layout and the result back out of it: strided copies
            # unless a layout happens to line up already, which the cost model cannot see, so it assumes not.
            fresh = (out_size, max(part_sizes), out_size)
            permuted = 2 * (sum(part_sizes) + out_size)
            steps.append(
                price(cal, f"einsum {sub}", flops, nbytes, mind, ops=3, fresh=fresh, permuted=permuted, batched=is_bmm)
            )
        ops = tuple((tuple(c[0]), c[2]) for c in info.contraction_list)
        plans.append(MPOPlan("einsum", "", (), tuple(steps), eq, tuple(path), optimize, einsum_steps=ops))
    return plans


def dense_seconds(cal: Calibration, shapes, rows: int, isz: int, passes: int = 1) -> float:
    """Predicted time of the equivalent dense layer (one GEMM per pass: fwd = 1, fwd+bwd = 3)."""
    n_in = _prod(s[1] for s in shapes)
    n_out = _prod(s[2] for s in shapes)
    step = price(
        cal,
        "dense",
        2 * rows * n_in * n_out,
        isz * (rows * n_in + n_in * n_out + rows * n_out),
        (rows, n_in, n_out),
        fresh=(isz * rows * n_out,),
    )
    return passes * step.seconds


def _matches(plan: MPOPlan, force: str | None) -> bool:
    if force is None or plan.kind == force:
        return True
    # One core: the sweep in either direction and the rebuild are the same single GEMM.
    return plan.kind == "rebuild" and plan.groups == ((0, 1),) and force in ("sweep-left", "sweep-right")


def decide(
    cal: Calibration,
    shapes: tuple[CoreShape, ...],
    rows: int,
    isz: int,
    *,
    needs_grad: bool,
    recompute: bool,
    force: str | None = None,
    force_fold: bool | None = None,
) -> MPODecision:
    """Search the candidates and return the decision (callers cache it; see plan.cache)."""
    if force is not None and force not in PLAN_KINDS:
        raise ValueError(f"plan: force must be one of {', '.join(PLAN_KINDS)} or None, got {force!r}")
    grouped = grouped_plans(cal, shapes, rows, isz, force_fold)
    candidates = grouped + einsum_plans(cal, shapes, rows, isz)
    allowed = [p for p in candidates if _matches(p, force)]
    if not allowed:
        raise ValueError(
            f"plan: no {force!r} plan exists for a chain of {len(shapes)} cores "
            "(merge needs 3 or more cores; einsum needs opt_einsum)"
        )
    ranked = sorted(allowed, key=lambda p: p.seconds)
    alternatives = tuple((p.label, p.seconds) for p in sorted(candidates, key=lambda p: p.seconds))
    n_in = _prod(s[1] for s in shapes)
    n_out = _prod(s[2] for s in shapes)
    common = dict(
        dense_bytes=n_in * n_out * isz,
        dense_seconds=dense_seconds(cal, shapes, rows, isz),
        alternatives=alternatives,
        rows=rows,
        shapes=tuple(shapes),
    )
    if not needs_grad:
        best = ranked[0]
        return MPODecision(best, None, False, best.seconds, 0.0, 0, **common)

    def bwd(p: MPOPlan) -> float:
        steps = sweep_backward_steps(cal, shapes, p.groups, p.direction, rows, isz, p.folds)
        return sum(s.seconds for s in steps)

    def recompute_cost(p: MPOPlan) -> float:
        # The backward needs every step's input state: the merges and all sweep steps but the last.
        return p.seconds - p.steps[-1].seconds

    # A backward always runs a grouped plan; forcing a kind forces the backward too (einsum has no backward).
    bwd_pool = [p for p in grouped if _matches(p, force)] or grouped
    best_split = min(bwd_pool, key=lambda p: recompute_cost(p) + bwd(p))
    split_total = ranked[0].seconds + recompute_cost(best_split) + bwd(best_split)
    choice = (ranked[0], best_split, False, split_total)
    if not recompute:
        for p in ranked:
            if p.kind == "einsum" or p not in bwd_pool:
                continue
            t = p.seconds + bwd(p)
            if t < choice[3]:
                choice = (p, p, True, t)
    fwd_plan, bwd_plan, save, _ = choice
    saved = saved_state_elems(shapes, bwd_plan.groups, bwd_plan.direction, rows) * isz if save else 0
    bwd_s = bwd(bwd_plan) + (0.0 if save else recompute_cost(bwd_plan))
    return MPODecision(fwd_plan, bwd_plan, save, fwd_plan.seconds, bwd_s, saved, **common)


def core_shapes(cores) -> tuple[CoreShape, ...]:
    return tuple(tuple(int(d) for d in g.shape) for g in cores)  # type: ignore[misc]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

"""Torch backend for the MPO chain: runs the planner's contraction inside one autograd.Function.

The forward looks its plan up (tnkernels.plan: a dict lookup keyed on static shapes; no search after the first
call), merges the cores of each group, and sweeps the rows through the merged cores with matmuls on views of a
layout chosen so that no step permutes a batch-sized tensor (see tnkernels/plan/mpo.py). The backward runs its
own planned contractions: the sweep in reverse (two matmuls per step) and the merges in reverse. It saves the
forward's intermediate states only when the plan says that is cheaper than recomputing them, and never under
`tnkernels.plan.options(recompute=True)`.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ...plan.cache import OPTIONS, mpo_decision, planned_rows
from ...plan.mpo import MPODecision, MPOPlan, einsum_operand_shapes
from ..grad_layout import in_layout_of
from ..modes import grads_of_rerun, needs_autograd, under_transform_or_dual
from . import torch_low_rank


def is_available() -> tuple[bool, str]:
    return True, ""


# ---------------------------------------------------------------------------------------------------- merging
def merge_group(cores, a: int, b: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Merge cores a..b-1 into one core (r0, I, J, r1); also return the partial merges the backward needs."""
    p = cores[a]
    partials = []
    for k in range(a + 1, b):
        g = cores[k]
        r0, ip, jp, r = p.shape
        _, i, j, r1 = g.shape
        partials.append(p)
        # [r0·Ip·Jp, r] @ [r, i·j·r1] -> [r0, Ip, Jp, i, j, r1] -> [r0, Ip, i, Jp, j, r1] (weight-sized copy)
        prod = (p.reshape(r0 * ip * jp, r) @ g.reshape(r, i * j * r1)).view(r0, ip, jp, i, j, r1)
        p = prod.permute(0, 1, 3, 2, 4, 5).reshape(r0, ip * i, jp * j, r1)
    return p, partials


def merge_group_backward(d_merged: torch.Tensor, cores, a: int, b: int, partials, grads: list) -> None:
    """Write d core_k for k in a..b-1 into `grads`, given d(merged core) and the partial merges."""
    d = d_merged
    for k in reversed(range(a + 1, b)):
        p, g = partials[k - a - 1], cores[k]
        r0, ip, jp, r = p.shape
        _, i, j, r1 = g.shape
        d2 = d.reshape(r0, ip, i, jp, j, r1).permute(0, 1, 3, 2, 4, 5).reshape(r0 * ip * jp, i * j * r1)
        grads[k] = (p.reshape(r0 * ip * jp, r).t() @ d2).view(g.shape)
        d = (d2 @ g.reshape(r, i * j * r1).t()).view(p.shape)
    grads[a] = d


# ----------------------------------------------------------------------------------------------------
# sweeping
def _core_matrix(core: torch.Tensor, direction: str) -> torch.Tensor:
    """The merged core as the [M, K] matrix of a step: left [J·r1, r0·I] (a view), right [r0·J, I·r1] (a
    copy)."""
    r0, i, j, r1 = core.shape
    if direction == "left":
        return core.reshape(r0 * i, j * r1).t()
    return core.permute(0, 2, 1, 3).reshape(r0 * j, i * r1)


def _step(state: torch.Tensor, cm: torch.Tensor, bp: int, n: int, fold: bool) -> torch.Tensor:
    """out[B', M, N] = cm[M, K] @ state[B', K, N].

    N == 1: one GEMM with the batch folded into M. fold: copy the state to [B'·N, K] and run one GEMM; the
    result is returned as a transposed view, which the next step's reshape copies back (the planner priced
    both copies). Otherwise a broadcast batched matmul on views, no copies."""
    m, k = cm.shape
    if n == 1:
        return state.reshape(bp, k) @ cm.t()
    if fold:
        s2 = state.reshape(bp, k, n).transpose(1, 2).reshape(bp * n, k)
        return (s2 @ cm.t()).view(bp, n, m).transpose(1, 2)
    return cm @ state.reshape(bp, k, n)


def _step_backward(
    d_out: torch.Tensor, state: torch.Tensor, cm: torch.Tensor, bp: int, n: int, fold: bool, need_state: bool
):
    m, k = cm.shape
    if n == 1:
        d2 = d_out.reshape(bp, m)
        s2 = state.reshape(bp, k)
        d_state = d2 @ cm if need_state else None
        return d_state, d2.t() @ s2
    if fold:
        d2 = d_out.reshape(bp, m, n).transpose(1, 2).reshape(bp * n, m)
        s2 = state.reshape(bp, k, n).transpose(1, 2).reshape(bp * n, k)
        d_state = (d2 @ cm).view(bp, n, k).transpose(1, 2) if need_state else None
        return d_state, d2.t() @ s2
    d3 = d_out.reshape(bp, m, n)
    s3 = state.reshape(bp, k, n)
    d_state = cm.t() @ d3 if need_state else None
    return d_state, torch.tensordot(d3, s3, dims=([0, 2], [0, 2]))


def _dims(merged: list[torch.Tensor], direction: str, rows: int) -> list[tuple[int, int]]:
    """(B', N) of each step in execution order (M and K come from the core matrix)."""
    out = []
    if direction == "left":
        j_before, i_after = 1, 1
        for c in merged:
            i_after *= c.shape[1]
        for c in merged:
            i_after //= c.shape[1]
            out.append((rows * j_before, i_after))
            j_before *= c.shape[2]
    else:
        i_before, j_after = 1, 1
        for c in merged:
            i_before *= c.shape[1]
        for c in reversed(merged):
            i_before //= c.shape[1]
            out.append((rows * i_before, j_after))
            j_after *= c.shape[2]
    return out


def run_grouped(x2d: torch.Tensor, cores, plan: MPOPlan, keep: bool, states_only: bool = False):
    """Forward of a grouped plan. Returns y[rows, out] and, if `keep`, what the backward needs.

    `states_only` (a backward recomputing its states) stops before the last step: the backward needs every step's
    input but not the output, and the last step is often the most expensive one (the whole GEMM of a rebuild)."""
    merged, partials = [], []
    for a, b in plan.groups:
        m, parts = merge_group(cores, a, b)
        merged.append(m)
        partials.append(parts)
    order = merged if plan.direction == "left" else merged[::-1]
    mats = [_core_matrix(c, plan.direction) for c in order]
    dims = _dims(merged, plan.direction, x2d.shape[0])
    state = x2d
    states = []
    folds = plan.folds or (False,) * len(mats)
    last = len(mats) - 1
    for k, (cm, (bp, n), fold) in enumerate(zip(mats, dims, folds, strict=True)):
        if keep or states_only:
            states.append(state)
        if states_only and k == last:
            return None, (states, mats, dims, partials)
        state = _step(state, cm, bp, n, fold)
    y = state.reshape(x2d.shape[0], -1)
    return y, (states, mats, dims, partials)


def backward_grouped(dy: torch.Tensor, cores, plan: MPOPlan, saved, need_x: bool, need_cores: bool):
    states, mats, dims, partials = saved
    d = dy
    d_mats: list[torch.Tensor | None] = [None] * len(mats)
    folds = plan.folds or (False,) * len(mats)
    for s in reversed(range(len(mats))):
        bp, n = dims[s]
        d, d_mats[s] = _step_backward(d, states[s], mats[s], bp, n, folds[s], need_state=(s > 0 or need_x))
    dx = d.reshape(dy.shape[0], -1) if need_x else None
    grads: list[torch.Tensor | None] = [None] * len(cores)
    if need_cores:
        ordered = d_mats if plan.direction == "left" else d_mats[::-1]
        for (a, b), dm, parts in zip(plan.groups, ordered, partials, strict=False):
            r0 = cores[a].shape[0]
            r1 = cores[b - 1].shape[3]
            i = j = 1
            for g in cores[a:b]:
                i, j = i * g.shape[1], j * g.shape[2]
            if plan.direction == "left":  # cm = core.reshape(r0·I, J·r1).t()
                d_core = dm.t().reshape(r0, i, j, r1)
            else:  # cm = core.permute(0, 2, 1, 3).reshape(r0·J, I·r1)
                d_core = dm.reshape(r0, j, i, r1).permute(0, 2, 1, 3)
            merge_group_backward(d_core, cores, a, b, parts, grads)
    return dx, grads


def run_einsum(x2d: torch.Tensor, cores, plan: MPOPlan) -> torch.Tensor:
    """The opt_einsum path, replayed as pairwise torch.einsum calls (as opt_einsum's contract() does)."""
    shapes = tuple(tuple(g.shape) for g in cores)  # plain ints: core shapes are static, even under torch.compile
    rows = x2d.shape[0]
    operand_shapes = einsum_operand_shapes(shapes, rows)
    operands = [x2d.reshape(operand_shapes[0])] + [g.reshape(s) for g, s in zip(cores, operand_shapes[1:], strict=True)]
    for positions, eq in plan.einsum_steps:
        picked = [operands.pop(p) for p in positions]
        operands.append(torch.einsum(eq, *picked))
    return operands[0].reshape(rows, -1)


def run_forward(x2d: torch.Tensor, cores, plan: MPOPlan, keep: bool):
    if plan.kind == "einsum":
        return run_einsum(x2d, cores, plan), None
    return run_grouped(x2d, cores, plan, keep)


# ----------------------------------------------------------------------------------------------------
# autograd
def _plain_operands(x2d: torch.Tensor, cores) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x2d and the cores detached from autograd. A view of a parameter keeps requires_grad even under no_grad,
    and torch.matmul then runs a [M, K] @ [B, K, N] step differently (it folds the batch into one GEMM and
    copies the transposed result back): the 2-core chain 384 -> 1536 (modes 24x16 -> 48x32, bond 5) at 1024 rows
    ran its left sweep in 5.5 ms with the layer's parameters and in 2.9 ms with the same tensors detached (one
    thread, 2026-12-01); through MPOLinear, 5.0 -> 3.2 ms."""
    return x2d.detach(), [g.detach() for g in cores]


class MPOChainFunction(torch.autograd.Function):
    """y = x2d @ W.T + bias with a planned forward and a planned backward."""

    @staticmethod
    def forward(ctx, x2d, bias, decision: MPODecision, *cores):
        # The inputs themselves are saved: a backward under create_graph differentiates through them.
        inputs = (x2d, *cores)
        # Detached: the backward is ours, and torch.matmul picks a slower path for operands that require grad
        # (see _plain_operands); the intermediates saved below are then detached too.
        x2d, cores = _plain_operands(x2d, cores)
        y, saved = run_forward(x2d, cores, decision.forward, keep=decision.save_states)
        if bias is not None:
            y = y + bias
        ctx.decision = decision
        ctx.has_bias = bias is not None
        if decision.save_states:
            states, mats, dims, partials = saved
            flat_partials = [t for parts in partials for t in parts]
            ctx.layout = (len(states), len(mats), [len(p) for p in partials], dims)
            ctx.save_for_backward(*inputs, *states[1:], *mats, *flat_partials)
        else:
            ctx.layout = None
            ctx.save_for_backward(*inputs)
        # y may be a view of the last step's result (a reshape); a Function returning a view forbids in-place
        # ops on it (`out += residual`, as Falcon does), so hand back an alias that is not a view (no copy).
        return y.detach()

    @staticmethod
    def backward(ctx, dy):
        dec: MPODecision = ctx.decision
        plan = dec.backward
        dy = dy.contiguous()  # an expanded dy (stride 0, from a sum or mean) sends the BLAS down a slow path
        saved_tensors = ctx.saved_tensors
        n_cores = len(dec.shapes)
        if torch.is_grad_enabled():  # create_graph=True (gradient penalties, MAML): see _differentiable_backward
            return _differentiable_backward(ctx, dy, saved_tensors[0], saved_tensors[1 : 1 + n_cores])
        x2d, cores = _plain_operands(saved_tensors[0], saved_tensors[1 : 1 + n_cores])
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_cores = any(ctx.needs_input_grad[3:])
        if ctx.layout is None:  # recompute the states of the backward plan
            with torch.no_grad():
                _, saved = run_grouped(x2d, cores, plan, keep=True, states_only=True)
        else:
            n_states, n_mats, part_lens, dims = ctx.layout
            rest = saved_tensors[1 + n_cores :]
            states = [x2d, *rest[: n_states - 1]]
            mats = list(rest[n_states - 1 : n_states - 1 + n_mats])
            flat = rest[n_states - 1 + n_mats :]
            partials, pos = [], 0
            for n in part_lens:
                partials.append(list(flat[pos : pos + n]))
                pos += n
            saved = (states, mats, dims, partials)
        dx, d_cores = backward_grouped(dy, cores, plan, saved, need_x, need_cores)
        d_bias = dy.sum(0) if (ctx.has_bias and need_bias) else None
        # the merges' backward leaves some core gradients permuted
        d_cores = [in_layout_of(d, g) for d, g in zip(d_cores, saved_tensors[1 : 1 + n_cores], strict=True)]
        return (dx, d_bias, None, *d_cores)


def _differentiable_backward(ctx, dy, x2d, cores):
    """The backward for create_graph=True: the planned forward run again on the inputs and differentiated
    (modes.grads_of_rerun)."""
    needs = [ctx.needs_input_grad[0], *ctx.needs_input_grad[3:]]

    def rerun():
        return run_forward(x2d, list(cores), ctx.decision.forward, keep=False)[0]

    dx, *d_cores = grads_of_rerun(rerun, (x2d, *cores), needs, dy)
    d_bias = dy.sum(0) if (ctx.has_bias and ctx.needs_input_grad[1]) else None
    return (dx, d_bias, None, *d_cores)


# ---------------------------------------------------------------------------------------------------- dense
# cache
# cores[0] (weakly) -> (stamp of all cores, W^T[in, out]); dropped when the first core dies. The stamp sees an
# optimizer step or any in-place edit (the version), a new tensor behind a parameter (`p.data = t`: the address)
# and module.half() / .to() (dtype, device). An in-place edit *through* `p.data` bypasses the version counter and
# is invisible: clear_dense_cache() after such edits (docs/planner.md).
_DENSE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # keyed by identity: tensors compare elementwise


def _cached_dense(cores) -> torch.Tensor:
    stamp = tuple((id(g), g._version, g.data_ptr(), g.dtype, g.device) for g in cores)
    hit = _DENSE.get(cores[0])
    if hit is not None and hit[0] == stamp:
        return hit[1]
    merged, _ = merge_group(cores, 0, len(cores))
    wt = merged.reshape(merged.shape[1], merged.shape[2])
    _DENSE[cores[0]] = (stamp, wt)
    return wt


def dense_cache_bytes() -> int:
    """Memory currently held by cache_dense weights."""
    return sum(v[1].numel() * v[1].element_size() for v in _DENSE.values())


def clear_dense_cache() -> None:
    _DENSE.clear()


# ---------------------------------------------------------------------------------------------------- entry
def _no_grad_route(dec, low_rank: bool) -> str:
    """How a no-grad call runs: "dense" (cache_dense and the chain costs more), "low-rank" or "chain"."""
    if OPTIONS.cache_dense and dec.forward.seconds > dec.dense_seconds and not torch.compiler.is_compiling():
        return "dense"
    return "low-rank" if low_rank else "chain"


def low_rank_route(x2d: torch.Tensor, cores: list[torch.Tensor], needs_grad: bool) -> tuple | None:
    """What an mpo_linear_torch call on x2d runs when it takes the low-rank route, for a caller that repeats such
    calls without re-deriving the route (MPOLinear's memo): ("views", A, B, flags), the cores' views for
    torch_low_rank.low_rank_apply, without autograd; ("function", save_h, flags), the arguments of
    torch_low_rank.low_rank_train, with it. None when the call takes another route."""
    rows = x2d.shape[0]
    if rows == 0 or not all(g.is_contiguous() for g in cores):
        return None  # a non-contiguous core would make the "views" copies, stale once the core changes
    shapes = tuple(tuple(g.shape) for g in cores)
    dec = mpo_decision(shapes, rows, x2d.dtype, x2d.device, needs_grad)
    if not torch_low_rank.applies(shapes, dec):
        return None
    if needs_grad:
        return "function", dec.save_states, torch_low_rank.cpp_flags(x2d, cores)
    if _no_grad_route(dec, True) != "low-rank":
        return None
    return ("views", *torch_low_rank.factors(cores), torch_low_rank.cpp_flags(x2d, cores))


def mpo_linear_torch(x: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.dim() == 2  # the common case needs neither reshape (each costs ~0.7 us, a tenth of a one-row call)
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    rows = x2d.shape[0]
    out_features = 1
    for g in cores:
        out_features *= g.shape[2]
    if rows == 0:  # nothing to contract (an MoE expert that got no tokens, a detector with no boxes)
        y = x2d.new_zeros(0, out_features) + (bias if bias is not None else 0)
        if needs_autograd(x, cores, bias):  # zero gradients for x and every core, as nn.Linear gives, not None
            y = y + sum(t.sum() for t in (x2d, *cores)) * 0
        return y.reshape(*x.shape[:-1], out_features)
    needs_grad = needs_autograd(x, cores, bias)
    shapes = tuple(tuple(g.shape) for g in cores)  # plain ints: core shapes are static, even under torch.compile
    plan_rows = planned_rows(rows)  # rows itself, except under torch.compile / export
    # vmap / grad / jacrev, and torch.export: the planned forward in plain differentiable ops, autograd after. An
    # exported graph records what runs, and is often trained: the detached operands of the paths below would be
    # recorded as aten.detach and cut every gradient through the layer, its input's included.
    if under_transform_or_dual() or torch.compiler.is_exporting():
        dec = mpo_decision(shapes, plan_rows, x.dtype, x.device, False)
        y, _ = run_forward(x2d, cores, dec.forward, keep=False)
        y = y if bias is None else y + bias
        return y if flat else y.reshape(*x.shape[:-1], out_features)
    dec = mpo_decision(shapes, plan_rows, x.dtype, x.device, needs_grad)
    low_rank = torch_low_rank.applies(shapes, dec)  # the same plan, run as two GEMMs without the bookkeeping
    if not needs_grad:
        route = _no_grad_route(dec, low_rank)
        if route == "dense":
            wt = _cached_dense(cores)
            # addmm fuses the bias into the GEMM, as F.linear does: no second pass over the output
            y = x2d @ wt if bias is None else torch.addmm(bias, x2d, wt)
        elif route == "low-rank":
            y = torch_low_rank.low_rank_forward(x2d, cores, bias)
        else:
            y, _ = run_forward(*_plain_operands(x2d, cores), dec.forward, keep=False)
            if bias is not None:
                y = y.add_(bias)  # y is this call's fresh result: adding in place saves an output-sized tensor
    elif low_rank:
        flags = torch_low_rank.cpp_flags(x2d, cores)
        y = torch_low_rank.low_rank_train(x2d, cores, bias, dec.save_states, flags)
    else:
        y = MPOChainFunction.apply(x2d, bias, dec, *cores)
    return y if flat else y.reshape(*x.shape[:-1], out_features)

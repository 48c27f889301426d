"""TT-SVD of a dense weight into MPO cores, and rank selection for MPO layers.

Convention (docs/ARCHITECTURE.md): W[out, in] with out = prod(j_k), in = prod(i_k), both split row-major, and core k
of shape (r_{k-1}, i_k, j_k, r_k). The sweep works on the tensor W[(i_1 j_1), (i_2 j_2), ...], peeling one merged
index (i_k j_k) per step with a truncated SVD. All arithmetic is float64; the cores come back in the weight's dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from .._int_pair import _index, int_tuple
from .errors import RatioUnreachableError
from .linalg import left_svd, left_svd_truncated
from .modes import max_bonds


def check_finite(weight: torch.Tensor, where: str) -> None:
    if weight.is_meta:  # no values: isfinite's .item() would fail with a message about meta tensors
        raise ValueError(
            f"{where}: the weight is on the meta device and has no values to decompose; load the trained weights "
            "first (to load a compressed checkpoint into a meta-device skeleton, use tnkernels.load_compressed)"
        )
    if not torch.isfinite(weight).all():
        raise ValueError(f"{where}: the weight contains NaN or Inf; fix or re-initialize the layer before tensorizing")


def _check_modes(weight: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int], where: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}: weight must be a torch.Tensor [out, in], got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    if len(in_modes) != len(out_modes) or len(in_modes) == 0:
        raise ValueError(
            f"{where}: in_modes {tuple(in_modes)} and out_modes {tuple(out_modes)} must be non-empty and of "
            "equal length"
        )
    if any((not isinstance(m, int)) or m < 1 for m in (*in_modes, *out_modes)):
        raise ValueError(f"{where}: modes must be positive ints, got {tuple(in_modes)} and {tuple(out_modes)}")
    out_features, in_features = weight.shape
    if math.prod(in_modes) != in_features:
        raise ValueError(
            f"{where}: in_modes {tuple(in_modes)} multiply to {math.prod(in_modes)}, but in_features is {in_features}; "
            f"use modes whose product is {in_features} (tnkernels.auto_modes({in_features}, {len(in_modes)}))"
        )
    if math.prod(out_modes) != out_features:
        raise ValueError(
            f"{where}: out_modes {tuple(out_modes)} multiply to {math.prod(out_modes)}, but out_features is "
            f"{out_features}; use modes whose product is {out_features}"
        )


def mpo_num_params(in_modes: Sequence[int], out_modes: Sequence[int], bonds: Sequence[int]) -> int:
    """Parameters of an MPO: sum_k r_{k-1} i_k j_k r_k. `bonds` are the N-1 internal bonds."""
    full = [1, *bonds, 1]
    return sum(full[k] * i * j * full[k + 1] for k, (i, j) in enumerate(zip(in_modes, out_modes)))


def mpo_bonds_for_cap(in_modes: Sequence[int], out_modes: Sequence[int], cap: int) -> list[int]:
    """Internal bonds min(cap, rank of the unfolding at each cut)."""
    return [min(cap, b) for b in max_bonds(tuple(in_modes), tuple(out_modes))]


def mpo_bonds_for_ratio(in_modes: Sequence[int], out_modes: Sequence[int], ratio: float) -> list[int]:
    """The largest uniform bond cap whose MPO has at most dense/ratio parameters.

    Raises ValueError for ratio <= 1 and RatioUnreachableError when even bond 1 has too many parameters.
    """
    check_ratio(ratio)
    dense = math.prod(in_modes) * math.prod(out_modes)
    budget = dense / ratio
    full = max(max_bonds(tuple(in_modes), tuple(out_modes)), default=1)
    if mpo_num_params(in_modes, out_modes, mpo_bonds_for_cap(in_modes, out_modes, 1)) > budget:
        best = dense / mpo_num_params(in_modes, out_modes, mpo_bonds_for_cap(in_modes, out_modes, 1))
        raise RatioUnreachableError(
            f"ratio {ratio:g} cannot be reached with modes {tuple(in_modes)} x {tuple(out_modes)}: the most this "
            f"structure compresses (bond 1) is {best:.3g}x; use more cores or a smaller ratio"
        )
    lo, hi = 1, full  # lo always fits the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mpo_num_params(in_modes, out_modes, mpo_bonds_for_cap(in_modes, out_modes, mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return mpo_bonds_for_cap(in_modes, out_modes, lo)


def check_ratio(ratio: float, where: str = "ratio") -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio):
        raise ValueError(f"{where}: must be a finite number > 1 (dense/tensorized parameters), got {ratio!r}")
    if ratio <= 1:
        raise ValueError(
            f"{where}: must be > 1 (ratio=4 means 4x fewer parameters), got {ratio:g}; a ratio <= 1 does not compress"
        )


def mpo_decompose(
    weight: torch.Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    *,
    max_bond: int | Sequence[int] | None = None,
    rel_tol: float | None = None,
    return_error: bool = False,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], float]:
    """TT-SVD of W[out_features, in_features] into MPO cores (r_{k-1}, i_k, j_k, r_k).

    Args:
        weight: dense weight in nn.Linear layout [out, in]; CPU or CUDA; any float dtype.
        in_modes / out_modes: factorizations of in_features / out_features (row-major, first mode slowest).
        max_bond: an int cap for every bond, or a list of N-1 caps (one per internal bond).
        rel_tol: relative Frobenius tolerance. The error budget rel_tol * ||W||_F is spent step by step (each SVD may
            use what earlier steps left over), so the total error never exceeds it. When `max_bond` also caps a bond
            below what the tolerance needs, the cap wins and a warning says so.
        return_error: also return the achieved relative error ||W - W_mpo||_F / ||W||_F.

    With neither max_bond nor rel_tol the decomposition is exact (up to float64 round-off).
    The error is exact, not a bound: left factors are orthonormal, so the squared errors of the steps add up.
    """
    where = "mpo_decompose"
    in_modes, out_modes = int_tuple(in_modes, "in_modes", where), int_tuple(out_modes, "out_modes", where)
    _check_modes(weight, in_modes, out_modes, where)
    check_finite(weight, where)
    n = len(in_modes)
    caps = _bond_caps(max_bond, n, where)
    if rel_tol is not None and not (isinstance(rel_tol, (int, float)) and 0 <= rel_tol < 1):
        raise ValueError(f"{where}: rel_tol must be in [0, 1), got {rel_tol!r}")

    w = weight.detach().to(torch.float64)
    norm = torch.linalg.norm(w).item()
    # W[j_1..j_N, i_1..i_N] -> T[i_1, j_1, i_2, j_2, ...]
    t = w.reshape(*out_modes, *in_modes)
    t = t.permute(*[p for k in range(n) for p in (n + k, k)]).contiguous()

    budget_sq = (rel_tol * norm) ** 2 if rel_tol is not None else 0.0
    err_sq = 0.0
    cores: list[torch.Tensor] = []
    r_prev = 1
    rest = t.reshape(-1)
    capped_below_tol = False
    for k in range(n - 1):
        rows = r_prev * in_modes[k] * out_modes[k]
        mat = rest.reshape(rows, -1)
        if rel_tol is None and caps is not None:
            # Only the leading caps[k] directions are kept: a truncated factorization is enough (and much cheaper).
            rank = min(caps[k], *mat.shape)
            u, s, p, discarded = left_svd_truncated(mat, rank)
            err_sq += discarded
            cores.append(u.reshape(r_prev, in_modes[k], out_modes[k], rank))
            rest, r_prev = p, rank
            continue
        u, s, p = left_svd(mat)
        rank = s.shape[0]
        if rel_tol is not None:
            # Spend an equal share of the remaining budget on each remaining step.
            allowed_sq = max(budget_sq - err_sq, 0.0) / (n - 1 - k)
            tail_sq = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])  # tail_sq[r] = sum_{q>=r} s_q^2
            fits = (tail_sq <= allowed_sq).nonzero()
            rank = int(fits[0].item()) if fits.numel() else rank
            rank = max(rank, 1)
        if caps is not None and caps[k] < rank:
            capped_below_tol = rel_tol is not None
            rank = caps[k]
        err_sq += float((s[rank:] ** 2).sum().item())
        cores.append(u[:, :rank].reshape(r_prev, in_modes[k], out_modes[k], rank))
        rest = p[:rank]
        r_prev = rank
    cores.append(rest.reshape(r_prev, in_modes[-1], out_modes[-1], 1))

    rel_err = math.sqrt(err_sq) / norm if norm > 0 else 0.0
    if capped_below_tol and rel_err > rel_tol:
        warnings.warn(
            f"{where}: max_bond capped the bonds below what rel_tol={rel_tol:g} needs; achieved error {rel_err:.3g}",
            stacklevel=2,
        )
    out_dtype = weight.dtype if weight.is_floating_point() else torch.float32
    cores = [c.to(out_dtype) for c in cores]
    return (cores, rel_err) if return_error else cores


def _bond_caps(max_bond: int | Sequence[int] | None, n: int, where: str) -> list[int] | None:
    if max_bond is None:
        return None
    if isinstance(max_bond, (tuple, list)):
        caps = list(max_bond)
    elif _index(max_bond) is not None:  # an int, a numpy integer (bools are refused below)
        caps = [_index(max_bond)] * (n - 1)
    else:  # a float or a string: list(2.5) failed with "'float' object is not iterable"
        caps = [max_bond]
    if len(caps) != n - 1 and isinstance(max_bond, (tuple, list)):
        raise ValueError(f"{where}: max_bond as a list needs {n - 1} entries (one per internal bond), got {len(caps)}")
    if any(_index(c) is None or _index(c) < 1 for c in caps):
        raise ValueError(
            f"{where}: max_bond must be a positive int or a list of them (got {max_bond!r}); bond 0 would erase "
            "the layer"
        )
    return [_index(c) for c in caps]

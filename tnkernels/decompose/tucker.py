"""Tucker-2 decomposition of conv kernels (HOSVD on the channel modes, optional HOOI refinement)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._int_pair import _index
from .errors import RatioUnreachableError
from .linalg import lapack_threads, left_svd
from .mpo import check_finite, check_ratio


def tucker_num_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of a Tucker-2 conv: C_out R_out + R_out R_in kh kw + C_in R_in."""
    c_out, c_in, kh, kw = shape
    r_out, r_in = ranks
    return c_out * r_out + r_out * r_in * kh * kw + c_in * r_in


def _check_kernel(weight: torch.Tensor, where: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = f"shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{where}: expected a conv kernel [C_out, C_in, kh, kw], got {shape}")
    check_finite(weight, where)


def _check_ranks(ranks: Sequence[int], shape: Sequence[int], where: str) -> tuple[int, int]:
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2 or any(_index(r) is None for r in ranks):
        raise ValueError(f"{where}: ranks must be a pair of ints (R_out, R_in), got {ranks!r}")
    r_out, r_in = _index(ranks[0]), _index(ranks[1])
    if not (1 <= r_out <= shape[0]) or not (1 <= r_in <= shape[1]):
        raise ValueError(
            f"{where}: ranks {tuple(ranks)} must satisfy 1 <= R_out <= {shape[0]} (C_out) and "
            f"1 <= R_in <= {shape[1]} (C_in)"
        )
    return r_out, r_in


def tucker_max_ranks(shape: Sequence[int]) -> tuple[int, int]:
    """The largest useful ranks of a Tucker-2 of a kernel of `shape` [C_out, C_in, kh, kw]: the ranks its channel
    unfoldings can have, R_out <= min(C_out, C_in kh kw) and R_in <= min(C_in, C_out kh kw). At these ranks the
    decomposition is exact. A 3 -> 32 3x3 stem has (27, 3), a 16 -> 8 1x1 conv (8, 8). Larger ranks (up to the
    channel counts) are accepted: their factors are completed with directions the kernel does not use."""
    c_out, c_in, kh, kw = (int(d) for d in shape)
    return min(c_out, c_in * kh * kw), min(c_in, c_out * kh * kw)


def _leading_left_vectors(mat: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` leading left singular vectors of `mat`; past its rank (a tall unfolding has at most as many as
    columns) completed to `rank` orthonormal columns, so the factors have the shapes asked for and stay exact."""
    u = left_svd(mat)[0]
    if u.shape[1] >= rank:
        return u[:, :rank]
    return _complete_orthonormal(u, rank)


def _complete_orthonormal(u: torch.Tensor, rank: int) -> torch.Tensor:
    """u [m, k] (orthonormal columns) followed by rank - k orthonormal columns orthogonal to it. Householder QR of
    [u, I]: its Q is orthonormal and its first k columns span u's, so the next ones span u's complement."""
    m, k = u.shape
    with lapack_threads(u):
        q = torch.linalg.qr(torch.cat([u, torch.eye(m, dtype=u.dtype, device=u.device)], dim=1))[0]
    return torch.cat([u, q[:, k:rank]], dim=1)


def tucker_decompose(
    weight: torch.Tensor, ranks: Sequence[int], *, n_iter: int = 0, return_error: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], float]:
    """Tucker-2 of W[C_out, C_in, kh, kw] into (U_out [C_out, R_out], core [R_out, R_in, kh, kw], U_in [C_in, R_in]).

    W ~= einsum('or,rsyx,is->oiyx', U_out, core, U_in). HOSVD initializes the factors from the leading left singular
    vectors of the output- and input-channel unfoldings; `n_iter` HOOI sweeps then refine them (never worse).
    Float64 arithmetic; results in the weight's dtype.
    """
    where = "tucker_decompose"
    _check_kernel(weight, where)
    r_out, r_in = _check_ranks(ranks, weight.shape, where)
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"{where}: n_iter must be a non-negative int, got {n_iter!r}")
    w = weight.detach().to(torch.float64)
    c_out, c_in, kh, kw = w.shape
    unfold_out = w.reshape(c_out, -1)
    unfold_in = w.transpose(0, 1).reshape(c_in, -1)
    u_out = _leading_left_vectors(unfold_out, r_out)
    u_in = _leading_left_vectors(unfold_in, r_in)
    for _ in range(n_iter):
        # HOOI: each factor is the best one given the other, i.e. the leading vectors of W projected on the other.
        proj_in = torch.einsum("oiyx,is->osyx", w, u_in).reshape(c_out, -1)
        u_out = _leading_left_vectors(proj_in, r_out)
        proj_out = torch.einsum("oiyx,or->iryx", w, u_out).reshape(c_in, -1)
        u_in = _leading_left_vectors(proj_out, r_in)
    core = torch.einsum("oiyx,or,is->rsyx", w, u_out, u_in)
    dtype = weight.dtype
    result = (u_out.to(dtype), core.to(dtype), u_in.to(dtype))
    if not return_error:
        return result
    norm = torch.linalg.norm(w).item()
    approx = torch.einsum("or,rsyx,is->oiyx", u_out, core, u_in)
    err = torch.linalg.norm(w - approx).item() / norm if norm > 0 else 0.0
    return result, err


def tucker_ranks_for_ratio(shape: Sequence[int], ratio: float) -> tuple[int, int]:
    """The largest ranks (R_out, R_in), proportional to (C_out, C_in), with at most dense/ratio parameters."""
    check_ratio(ratio)
    c_out, c_in, kh, kw = shape
    budget = c_out * c_in * kh * kw / ratio

    def ranks_at(frac: float) -> tuple[int, int]:
        return max(1, min(c_out, math.floor(frac * c_out))), max(1, min(c_in, math.floor(frac * c_in)))

    if tucker_num_params(shape, (1, 1)) > budget:
        raise RatioUnreachableError(
            f"ratio {ratio:g} cannot be reached by a Tucker-2 conv of shape {tuple(shape)}: even ranks (1, 1) keep "
            f"{tucker_num_params(shape, (1, 1))} of {c_out * c_in * kh * kw} parameters"
        )
    best = (1, 1)
    # Scan every distinct proportional rank pair (there are at most max(C_out, C_in) of them) and keep the largest
    # that fits; then greedily grow whichever rank still fits, so the budget is used as fully as possible.
    for step in range(1, max(c_out, c_in) + 1):
        cand = ranks_at(step / max(c_out, c_in))
        if tucker_num_params(shape, cand) <= budget:
            best = max(best, cand, key=lambda r: r[0] * r[1])
    r_o, r_i = best
    grown = True
    while grown:
        grown = False
        for cand in ((r_o + 1, r_i), (r_o, r_i + 1)):
            if cand[0] <= c_out and cand[1] <= c_in and tucker_num_params(shape, cand) <= budget:
                r_o, r_i = cand
                grown = True
                break
    return r_o, r_i


def tucker_rank_frontier(
    shape: Sequence[int], ratio: float, *, spread: float = 0.3, most: int = 8
) -> list[tuple[int, int]]:
    """Rank pairs (R_out, R_in) that reach `ratio` using its budget about as fully as the default pair
    (tucker_ranks_for_ratio, listed first): for about `most` values of R_out (multiples of 4) within `spread` of
    the default's, the largest R_in that fits. They depend on the shape only, so their timings can be shared by
    every kernel of the shape (ops/tucker/ranks.py)."""
    check_ratio(ratio)
    c_out, c_in, kh, kw = shape
    default = tucker_ranks_for_ratio(shape, ratio)
    budget = c_out * c_in * kh * kw / ratio
    found = [default]
    lo, hi = max(1, math.floor(default[0] * (1 - spread))), min(c_out, math.ceil(default[0] * (1 + spread)))
    step = 4 * max(1, math.ceil((hi - lo) / (4 * most)))
    for r_out in range(lo - lo % step or step, hi + 1, step):
        r_in = min(c_in, math.floor((budget - c_out * r_out) / (r_out * kh * kw + c_in)))
        pair = (r_out, r_in)
        if r_in >= 1 and pair not in found and tucker_num_params(shape, pair) <= budget:
            found.append(pair)
    return found


def tucker_rank_candidates(weight: torch.Tensor, ratio: float, *, error_slack: float = 0.05) -> list[tuple[int, int]]:
    """The pairs of `tucker_rank_frontier` whose HOSVD error bound is at most the default pair's times
    (1 + error_slack): the default first, then in order of their error bound, smallest first.

    At equal parameter count the pair decides how fast the convolutions run: channel counts off the kernels'
    blocking run at about half the rate (oneDNN, EPYC VM: a 38-channel 3x3 core against a 32-channel one), so
    TuckerConv2d.from_conv times them on a CPU (ops/tucker/ranks.py). The bound, from the two channel unfoldings'
    singular values, costs two small SVDs for all pairs together."""
    _check_kernel(weight, "tucker_rank_candidates")  # before the SVDs, which fail obscurely on NaN
    shape = tuple(weight.shape)
    c_out, c_in = shape[:2]
    default, *others = tucker_rank_frontier(shape, ratio)
    w = weight.detach().to(torch.float64)
    tail_out = _tail_energy(torch.linalg.svdvals(w.reshape(c_out, -1)), c_out)
    tail_in = _tail_energy(torch.linalg.svdvals(w.transpose(0, 1).reshape(c_in, -1)), c_in)

    def bound(pair: tuple[int, int]) -> float:
        return math.sqrt(tail_out[pair[0]] + tail_in[pair[1]])

    limit = bound(default) * (1 + error_slack) + 1e-12
    return [default, *sorted((p for p in others if bound(p) <= limit), key=bound)]


def _tail_energy(singular_values: torch.Tensor, size: int) -> list[float]:
    """tail[r] = sum of the squared singular values past the r-th (what keeping r discards), r = 0..size."""
    energy = torch.zeros(size + 1, dtype=torch.float64)
    sq = singular_values.square()
    energy[: sq.numel()] = sq.flip(0).cumsum(0).flip(0)
    return energy.tolist()


def tucker_ranks_for_error(weight: torch.Tensor, rel_tol: float) -> tuple[int, int]:
    """Smallest HOSVD ranks whose truncation error is at most rel_tol * ||W||_F.

    The Tucker-2 truncation error squared is at most the sum of the energies discarded in the two unfoldings, so
    each mode gets half of the squared budget.
    """
    if not (isinstance(rel_tol, (int, float)) and 0 <= rel_tol < 1):
        raise ValueError(f"tucker_ranks_for_error: rel_tol must be in [0, 1), got {rel_tol!r}")
    _check_kernel(weight, "tucker_ranks_for_error")
    w = weight.detach().to(torch.float64)
    allowed_sq = (rel_tol * torch.linalg.norm(w).item()) ** 2 / 2
    ranks = []
    for mat in (w.reshape(w.shape[0], -1), w.transpose(0, 1).reshape(w.shape[1], -1)):
        s = left_svd(mat)[1]
        tail_sq = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])
        fits = (tail_sq <= allowed_sq).nonzero()
        ranks.append(max(1, int(fits[0].item())) if fits.numel() else s.numel())  # full: the unfolding's rank
    return ranks[0], ranks[1]

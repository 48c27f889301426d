"""Choose an MPO structure (number of cores, modes, bonds) for a compression ratio by predicted time.

At equal parameter count the structure decides the FLOPs: two cores with a large bond often cost far less than
four cores with a small one, and the error of the truncation differs too. `choose_mpo_structure` enumerates
2..max_cores cores with balanced modes, gives each the largest uniform bond that still reaches the ratio,
prices
each with the planner at a typical row count, and (when the weight is given) measures each one's TT-SVD error.
prefer="speed" takes the fastest structure whose error is not clearly worse than the best one
(error <= best * (1 + error_slack)); prefer="accuracy" takes the most accurate one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cache import mpo_decision


@dataclass(frozen=True)
class MPOStructure:
    num_cores: int
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    bonds: tuple[int, ...]  # r_1 .. r_{N-1}
    params: int
    ratio: float
    predicted_seconds: float  # forward at `rows` rows, best plan
    rel_error: (
        float | None
    )  # relative Frobenius error of the TT-SVD truncation (bound), None without a weight

    def core_shapes(self) -> tuple[tuple[int, int, int, int], ...]:
        r = (1, *self.bonds, 1)
        return tuple((r[k], self.in_modes[k], self.out_modes[k], r[k + 1]) for k in range(self.num_cores))


def balanced_factors(n: int, k: int) -> tuple[int, ...] | None:
    """Split n into k integer factors >= 2 as equal as possible (largest first); None if n has too few
    primes."""
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    if len(primes) < k:
        return None
    buckets = [1] * k
    for q in sorted(primes, reverse=True):  # largest prime into the currently smallest bucket
        buckets[buckets.index(min(buckets))] *= q
    return tuple(sorted(buckets, reverse=True))


def _bond_caps(in_modes, out_modes) -> list[int]:
    """The largest useful bond at each cut: the rank bound of the reshaped weight there."""
    sizes = [i * j for i, j in zip(in_modes, out_modes, strict=False)]
    return [min(math.prod(sizes[: c + 1]), math.prod(sizes[c + 1 :])) for c in range(len(sizes) - 1)]


def _params(in_modes, out_modes, bonds) -> int:
    r = (1, *bonds, 1)
    return sum(r[k] * in_modes[k] * out_modes[k] * r[k + 1] for k in range(len(in_modes)))


def _bonds_for_ratio(in_modes, out_modes, target_params: float) -> tuple[int, ...] | None:
    caps = _bond_caps(in_modes, out_modes)
    best = None
    lo, hi = 1, max(caps)
    while lo <= hi:  # the largest uniform bond D (capped per cut) whose parameter count reaches the ratio
        d = (lo + hi) // 2
        bonds = tuple(min(d, c) for c in caps)
        if _params(in_modes, out_modes, bonds) <= target_params:
            best, lo = bonds, d + 1
        else:
            hi = d - 1
    return best


def tt_error(weight: torch.Tensor, in_modes, out_modes, bonds) -> float:
    """Relative error bound sqrt(sum of squared discarded singular values) / ||W|| of TT-SVD with these
    bonds."""
    n = len(in_modes)
    # float64 for small weights; float32 for big ones, where the eigh would dominate from_linear's time and
    # the
    # tail being measured (errors of 1e-2 and up at useful ratios) is far above float32 round-off.
    dtype = torch.float64 if weight.numel() <= (1 << 20) else torch.float32
    w = weight.detach().to(dtype).reshape(*out_modes, *in_modes)
    # W[j_1..j_N, i_1..i_N] -> T[(i_1 j_1), (i_2 j_2), ...], the MPO's site order
    perm = [a for k in range(n) for a in (n + k, k)]
    t = w.permute(perm).reshape(-1)
    norm2 = float(t.square().sum())
    if norm2 == 0:
        return 0.0
    discarded, rank = 0.0, 1
    rest = t
    for k in range(n - 1):
        m = rest.reshape(rank * in_modes[k] * out_modes[k], -1)
        # Singular values from the eigenvalues of the smaller Gram matrix: an eigh of a GEMM result is many
        # times
        # faster than an SVD on a CPU, and float64 keeps the squared spectrum accurate enough for an error
        # bound.
        if m.shape[0] <= m.shape[1]:
            lam, u = torch.linalg.eigh(m @ m.T)
            lam, u = lam.flip(0).clamp_min(0), u.flip(1)
            r = min(bonds[k], lam.numel())
            rest = u[:, :r].T @ m  # = S_r V_r^T
        else:
            lam, v = torch.linalg.eigh(m.T @ m)
            lam, v = lam.flip(0).clamp_min(0), v.flip(1)
            r = min(bonds[k], lam.numel())
            rest = lam[:r].sqrt()[:, None] * v[:, :r].T  # = S_r V_r^T
        discarded += float(lam[r:].sum())
        rank = r
    return math.sqrt(discarded / norm2)


def structure_candidates(
    out_features: int,
    in_features: int,
    ratio: float,
    *,
    rows: int = 1024,
    weight: torch.Tensor | None = None,
    max_cores: int = 5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[MPOStructure]:
    """Every balanced structure with 2..max_cores cores that reaches `ratio`, with predicted time (and
    error)."""
    if ratio <= 1:
        raise ValueError(
            f"choose_mpo_structure: ratio must be > 1 (dense / tensorized parameters), got {ratio}"
        )
    if weight is not None and tuple(weight.shape) != (out_features, in_features):
        raise ValueError(
            f"choose_mpo_structure: weight has shape {tuple(weight.shape)}, "
            f"expected ({out_features}, {in_features})"
        )
    target = out_features * in_features / ratio
    out = []
    for n in range(2, max_cores + 1):
        in_modes = balanced_factors(in_features, n)
        out_modes = balanced_factors(out_features, n)
        if in_modes is None or out_modes is None:
            continue
        bonds = _bonds_for_ratio(in_modes, out_modes, target)
        if bonds is None:
            continue
        params = _params(in_modes, out_modes, bonds)
        s = MPOStructure(
            n, in_modes, out_modes, bonds, params, out_features * in_features / params, 0.0, None
        )
        dec = mpo_decision(s.core_shapes(), rows, dtype, torch.device(device), False)
        err = tt_error(weight, in_modes, out_modes, bonds) if weight is not None else None
        out.append(MPOStructure(n, in_modes, out_modes, bonds, params, s.ratio, dec.forward.seconds, err))
    return out


def choose_mpo_structure(
    out_features: int,
    in_features: int,
    ratio: float,
    *,
    rows: int = 1024,
    prefer: str = "speed",
    weight: torch.Tensor | None = None,
    error_slack: float = 0.2,
    max_cores: int = 5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> MPOStructure:
    """Pick cores/modes/bonds reaching `ratio` (see the module docstring).

    Example:
        >>> s = choose_mpo_structure(6400, 1600, 16, rows=1024)
        >>> s.num_cores, s.in_modes, s.out_modes, s.bonds
    """
    if prefer not in ("speed", "accuracy"):
        raise ValueError(f"choose_mpo_structure: prefer must be 'speed' or 'accuracy', got {prefer!r}")
    cands = structure_candidates(
        out_features,
        in_features,
        ratio,
        rows=rows,
        weight=weight,
        max_cores=max_cores,
        dtype=dtype,
        device=device,
    )
    if not cands:
        raise ValueError(
            f"choose_mpo_structure: no MPO of 2..{max_cores} cores reaches ratio {ratio} for a "
            f"{out_features}x{in_features} weight; lower the ratio or raise max_cores"
        )
    if prefer == "accuracy":
        if weight is None:  # without the weight, the largest bonds are the best guess for accuracy
            return min(cands, key=lambda s: (s.num_cores, s.predicted_seconds))
        return min(cands, key=lambda s: (s.rel_error, s.predicted_seconds))
    if weight is not None:
        best_err = min(s.rel_error for s in cands)  # type: ignore[type-var]
        cands = [s for s in cands if s.rel_error <= best_err * (1 + error_slack) + 1e-12]  # type: ignore[operator]
    return min(cands, key=lambda s: s.predicted_seconds)

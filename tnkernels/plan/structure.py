"""Choose an MPO structure (number of cores, modes, bonds) for a compression ratio by predicted time.

At equal parameter count the structure decides the FLOPs: two cores with a large bond often cost far less
than four cores with a small one, and the truncation error differs too. `structure_candidates` enumerates
2..max_cores cores with the modes and rank selection MPOLinear.from_linear uses (auto_modes,
mpo_bonds_for_ratio), plus the most lopsided 2-core split, modes (in, 1) x (1, out): a rank-r factorisation
W = B A, the MPO whose chain costs exactly dense/ratio FLOPs at every row count (a balanced 2-core chain at a
moderate ratio costs more than the dense product, which is why the planner so often has to rebuild the
weight). It is priced with the planner at a typical row count like the others.
`choose_mpo_structure(prefer="speed")` takes, among the structures predicted no slower than the dense layer, the
fastest one whose TT-SVD error is not clearly worse than the balanced 2-core structure's (error <= reference *
(1 + error_slack)); errors are computed lazily, fastest first, since each costs SVD-sized work.
prefer="accuracy" takes the most accurate one, whatever its speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..decompose import RatioUnreachableError, auto_modes, mpo_bonds_for_ratio, mpo_num_params
from ..decompose.linalg import lapack_threads
from ..decompose.mpo import check_finite, mpo_bonds_for_cap
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
    rel_error: float | None  # relative Frobenius error bound of the TT-SVD truncation; None if not computed

    @property
    def is_low_rank(self) -> bool:
        """Modes (in, 1) x (1, out): a plain rank-`bonds[0]` factorisation of the weight."""
        return self.num_cores == 2 and self.out_modes[0] == 1 and self.in_modes[1] == 1

    @property
    def label(self) -> str:
        return "low-rank" if self.is_low_rank else f"{self.num_cores} cores"

    def core_shapes(self) -> tuple[tuple[int, int, int, int], ...]:
        r = (1, *self.bonds, 1)
        return tuple((r[k], self.in_modes[k], self.out_modes[k], r[k + 1]) for k in range(self.num_cores))

    def with_error(self, err: float) -> MPOStructure:
        return MPOStructure(
            self.num_cores, self.in_modes, self.out_modes, self.bonds, self.params, self.ratio,
            self.predicted_seconds, err,
        )  # fmt: skip


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
        # times faster than an SVD on a CPU, and the squared spectrum is accurate enough for an error bound.
        if m.shape[0] <= m.shape[1]:
            gram = m @ m.T
            with lapack_threads(gram):
                lam, u = torch.linalg.eigh(gram)
            lam, u = lam.flip(0).clamp_min(0), u.flip(1)
            r = min(bonds[k], lam.numel())
            rest = u[:, :r].T @ m  # = S_r V_r^T
        else:
            gram = m.T @ m
            with lapack_threads(gram):
                lam, v = torch.linalg.eigh(gram)
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
    low_rank: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[MPOStructure]:
    """Each structure of 2..max_cores cores reaching `ratio` (and the low-rank split unless `low_rank=False`):
    predicted time, and error given `weight`."""
    if not ratio > 1:
        raise ValueError(f"choose_mpo_structure: ratio must be > 1 (dense / tensorized parameters), got {ratio}")
    if weight is not None and tuple(weight.shape) != (out_features, in_features):
        raise ValueError(
            f"choose_mpo_structure: weight has shape {tuple(weight.shape)}, expected ({out_features}, {in_features})"
        )
    out = []
    for in_modes, out_modes in _splits(out_features, in_features, max_cores, low_rank):
        n = len(in_modes)
        try:
            bonds = tuple(mpo_bonds_for_ratio(in_modes, out_modes, ratio))
        except ValueError:  # the ratio is unreachable with these modes (a subclass)
            continue
        params = mpo_num_params(in_modes, out_modes, bonds)
        s = MPOStructure(n, in_modes, out_modes, bonds, params, out_features * in_features / params, 0.0, None)
        dec = mpo_decision(s.core_shapes(), rows, dtype, torch.device(device), False)
        s = MPOStructure(n, in_modes, out_modes, bonds, params, s.ratio, dec.forward.seconds, None)
        out.append(s.with_error(tt_error(weight, in_modes, out_modes, bonds)) if weight is not None else s)
    return out


def _splits(out_features: int, in_features: int, max_cores: int, low_rank: bool) -> list[tuple[tuple, tuple]]:
    """(in_modes, out_modes) of each structure structure_candidates prices."""
    splits = []
    for n in range(2, max_cores + 1):
        try:
            splits.append((auto_modes(in_features, n), auto_modes(out_features, n)))
        except ValueError:  # too few prime factors or a lopsided split
            continue
    if low_rank:  # also fine for prime sizes (GPT-2's vocabulary), which auto_modes refuses
        splits.append(((in_features, 1), (1, out_features)))
    return splits


def _unreachable(out_features: int, in_features: int, ratio: float, max_cores: int, low_rank: bool):
    """The RatioUnreachableError of a weight no structure compresses `ratio`-fold, with the most any does."""
    dense = out_features * in_features
    best = max(
        (
            dense / mpo_num_params(i, o, mpo_bonds_for_cap(i, o, 1))
            for i, o in _splits(out_features, in_features, max_cores, low_rank)
        ),
        default=1.0,
    )
    kinds = f"2..{max_cores} cores" + (" (the low-rank split included)" if low_rank else "")
    return RatioUnreachableError(
        f"ratio {ratio:g} cannot be reached: no MPO of {kinds} compresses a {out_features}x{in_features} weight "
        f"more than {best:.3g}x (bond 1); lower the ratio or leave the layer dense"
    )


def choose_mpo_structure(
    out_features: int,
    in_features: int,
    ratio: float,
    *,
    rows: int = 1024,
    prefer: str = "speed",
    weight: torch.Tensor | None = None,
    error_slack: float = 0.05,
    max_cores: int = 5,
    low_rank: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> MPOStructure:
    """Pick cores / modes / bonds reaching `ratio` (see the module docstring).

    Example:
        >>> s = choose_mpo_structure(6400, 1600, 16, rows=1024)
        >>> s.num_cores, s.in_modes, s.out_modes, s.bonds
    """
    if prefer not in ("speed", "accuracy"):
        raise ValueError(f"choose_mpo_structure: prefer must be 'speed' or 'accuracy', got {prefer!r}")
    if weight is not None and tuple(weight.shape) != (out_features, in_features):
        raise ValueError(
            f"choose_mpo_structure: weight has shape {tuple(weight.shape)}, expected ({out_features}, {in_features})"
        )
    if weight is not None:
        check_finite(weight, "choose_mpo_structure")  # before any eigh, which fails obscurely on NaN
    lazy = weight if prefer == "accuracy" else None  # speed computes errors lazily below
    cands = structure_candidates(
        out_features,
        in_features,
        ratio,
        rows=rows,
        weight=lazy,
        max_cores=max_cores,
        low_rank=low_rank,
        dtype=dtype,
        device=device,
    )
    if not cands:  # a RatioUnreachableError: tensorize leaves such a layer dense (a 256 -> 1 head), with the reason
        exc = _unreachable(out_features, in_features, ratio, max_cores, low_rank)
        raise RatioUnreachableError(f"choose_mpo_structure: {exc}")
    if prefer == "accuracy":
        if weight is None:  # without the weight, the fewest cores (largest bonds) are the best guess
            return min(cands, key=lambda s: (s.num_cores, s.predicted_seconds))
        return min(cands, key=lambda s: (s.rel_error, s.predicted_seconds))
    by_time = sorted(cands, key=lambda s: s.predicted_seconds)
    if weight is None:
        return by_time[0]
    # Accuracy never buys a structure slower than the dense layer: only those predicted no slower than the dense
    # GEMM at `rows` compete (the low-rank split always is, at dense / ratio FLOPs). A random 576 x 49152 head at
    # ratio 4 (SmolLM's shape) had picked the balanced 2-core split for a 7% smaller error: 3.3x the low-rank
    # split's predicted time at 1024 rows, and at one row 24 ms against the dense layer's 7 ms.
    dense = mpo_decision(by_time[0].core_shapes(), rows, dtype, torch.device(device), False).dense_seconds
    by_time = [s for s in by_time if s.predicted_seconds <= dense] or by_time
    # The reference for "clearly worse" is the balanced 2-core split (MPOLinear's default), or the low-rank one
    # where the sizes cannot be split, among those.
    ref = min(by_time, key=lambda s: (s.num_cores, s.is_low_rank))
    if by_time[0] is ref:  # the common case: no error needs computing at all
        return ref
    ref_err = tt_error(weight, ref.in_modes, ref.out_modes, ref.bonds)
    for s in by_time:
        err = ref_err if s is ref else tt_error(weight, s.in_modes, s.out_modes, s.bonds)
        if s is ref or err <= ref_err * (1 + error_slack) + 1e-12:
            return s.with_error(err)
    raise AssertionError("unreachable: the reference structure is among the candidates")

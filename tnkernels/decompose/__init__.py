"""Decompositions (pure math on tensors): MPO / TT-SVD, Tucker-2, mode factorization and rank selection."""

from .errors import RatioUnreachableError
from .linalg import lapack_threads
from .modes import auto_modes, max_bonds, nearest_balanced_size, prime_factors
from .mpo import check_ratio, mpo_bonds_for_cap, mpo_bonds_for_ratio, mpo_decompose, mpo_num_params
from .tucker import (
    tucker_decompose,
    tucker_max_ranks,
    tucker_num_params,
    tucker_rank_candidates,
    tucker_rank_frontier,
    tucker_ranks_for_error,
    tucker_ranks_for_ratio,
)

__all__ = [
    "RatioUnreachableError",
    "auto_modes",
    "check_ratio",
    "lapack_threads",
    "max_bonds",
    "mpo_bonds_for_cap",
    "mpo_bonds_for_ratio",
    "mpo_decompose",
    "mpo_num_params",
    "nearest_balanced_size",
    "prime_factors",
    "tucker_decompose",
    "tucker_max_ranks",
    "tucker_num_params",
    "tucker_rank_candidates",
    "tucker_rank_frontier",
    "tucker_ranks_for_error",
    "tucker_ranks_for_ratio",
]

"""Plain-torch MPO reference: the ground truth for tests and the simplest correct path.

Works in any dtype (float64 included) and on any device. It sweeps the cores from the first to the last, which
is correct but not always the cheapest order; the planner (tnkernels.plan) chooses better orders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_mpo_cores(cores: Sequence[torch.Tensor], where: str = "mpo_linear") -> None:
    """Raise ValueError unless `cores` form a valid MPO chain (4-D, matching bonds, boundary bonds of 1)."""
    if len(cores) == 0:
        raise ValueError(f"{where}: needs at least one core")
    for k, g in enumerate(cores):
        if g.dim() != 4:
            raise ValueError(f"{where}: core {k} must be 4-D (r_prev, i, j, r_next), got shape {tuple(g.shape)}")
        if k > 0 and cores[k - 1].shape[3] != g.shape[0]:
            raise ValueError(
                f"{where}: bond mismatch between core {k - 1} (r_next={cores[k - 1].shape[3]}) "
                f"and core {k} (r_prev={g.shape[0]})"
            )
    if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
        raise ValueError(f"{where}: boundary bonds must be 1, got r_0={cores[0].shape[0]}, r_N={cores[-1].shape[3]}")


def mpo_to_dense(cores: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Contract MPO cores `(r_{k-1}, i_k, j_k, r_k)` into the dense weight `W[out_features, in_features]`."""
    check_mpo_cores(cores, "mpo_to_dense")  # not per call of a layer: a rebuild (to_dense, cache_dense) only
    # acc[I, J, r] accumulates the merged input index I = (i_1..i_k), output index J = (j_1..j_k).
    acc = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], cores[0].shape[3])
    for g in cores[1:]:
        r0, i, j, r1 = g.shape
        big_i, big_j = acc.shape[0], acc.shape[1]
        # [I, J, r0] x [r0, i*j*r1] -> [I, J, i, j, r1] -> [I, i, J, j, r1]
        acc = (acc.reshape(big_i * big_j, r0) @ g.reshape(r0, i * j * r1)).reshape(big_i, big_j, i, j, r1)
        acc = acc.permute(0, 2, 1, 3, 4).reshape(big_i * i, big_j * j, r1)
    return acc[:, :, 0].transpose(0, 1)


def mpo_linear_reference(
    x: torch.Tensor, cores: list[torch.Tensor] | tuple[torch.Tensor, ...], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W.T + bias, contracting the cores one at a time against the input (left-to-right sweep).

    x: [..., in_features] -> y: [..., out_features]. Differentiable through ordinary autograd.
    """
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    # state[b, J_done, r, I_rest]: output modes produced so far, bond, input modes still to consume.
    state = x.reshape(rows, 1, 1, -1)
    for g in cores:
        r0, i, j, r1 = g.shape
        b, big_j, _, rest = state.shape
        rest_after = rest // i
        # [b, J, r0, i, rest'] -> [b, J, rest', r0*i] @ [r0*i, j*r1] -> [b, J, rest', j, r1]
        s = state.reshape(b, big_j, r0, i, rest_after).permute(0, 1, 4, 2, 3).reshape(b * big_j * rest_after, r0 * i)
        s = (s @ g.reshape(r0 * i, j * r1)).reshape(b, big_j, rest_after, j, r1)
        state = s.permute(0, 1, 3, 4, 2).reshape(b, big_j * j, r1, rest_after)
    y = state.reshape(*lead, -1)
    if bias is not None:
        y = y + bias
    return y

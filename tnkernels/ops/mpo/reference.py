"""Plain-torch MPO reference: the ground truth for tests and the simplest correct path.

Works in any dtype (float64 included) and on any device. It sweeps the cores from the first to the last, which
is correct but not always the cheapest order; the planner (tnkernels.plan) chooses better orders.
"""

from __future__ import annotations

import torch


def mpo_to_dense(cores: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Contract MPO cores `(r_{k-1}, i_k, j_k, r_k)` into the dense weight `W[out_features, in_features]`."""
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

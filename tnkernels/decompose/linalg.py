"""A left-singular-vector factorization that is fast for the wide matrices decompositions produce.

LAPACK's SVD of a wide m x n matrix (m << n) spends most of its time on the right singular vectors, which the
sweeps never need: they keep `U^T A` instead. An eigendecomposition of the m x m Gram matrix gives U and s at a
fraction of the cost (measured: 512 x 4608 float64, 1.5 s vs 25 s on 2 busy cores). Squaring the matrix only
blurs singular values below ~1e-8 of the largest, far under any truncation tolerance in use; at full rank U is a
complete orthonormal basis, so reconstructions stay exact to round-off. Tall matrices are first reduced by QR.
"""

from __future__ import annotations

import torch


def left_svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (U [m, k], s [k], P [k, n]) with mat = U @ P, U orthonormal, rows of P orthogonal with norms s,
    sorted by decreasing s; k = min(m, n). P equals diag(s) @ Vh of the SVD."""
    m, n = mat.shape
    if m > n:
        q, r = torch.linalg.qr(mat)  # q [m, n], r [n, n]
        u_r, s, p = left_svd(r)
        return q @ u_r, s, p
    gram = mat @ mat.transpose(0, 1)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    u = evecs
    p = u.transpose(0, 1) @ mat
    # The norms of P's rows are the singular values; they are more accurate than sqrt(evals) for small ones.
    s = torch.linalg.vector_norm(p, dim=1)
    order = torch.argsort(s, descending=True)
    return u[:, order], s[order], p[order]

"""A left-singular-vector factorization that is fast for the wide matrices decompositions produce.

LAPACK's SVD of a wide m x n matrix (m << n) spends most of its time on the right singular vectors, which the
sweeps never need: they keep `U^T A` instead. An eigendecomposition of the m x m Gram matrix gives U and s at a
fraction of the cost (measured: 512 x 4608 float64, 1.5 s vs 25 s on 2 busy cores). Squaring the matrix only
blurs singular values below ~1e-8 of the largest, far under any truncation tolerance in use; at full rank U is a
complete orthonormal basis, so reconstructions stay exact to round-off. Tall matrices are first reduced by QR.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# LAPACK factorizations (eigh, svd, qr) synchronize their threads at every panel step. When the machine's cores
# are busy with other work, each sync waits for a descheduled thread, and a multi-threaded factorization crawls:
# measured on this project's 2-core box with another job running, float64 eigh of 256 x 256: 2.9 s on 2 threads,
# 0.012 s on 1; of 1600 x 1600: 23.3 s against 1.25 s; svd of 512 x 256: 9.5 s against 0.21 s. Up to this size
# one thread is fast anyway, so factorizations run single-threaded there (the GEMMs around them keep all threads).
_SINGLE_THREAD_MAX = 2048


@contextlib.contextmanager
def lapack_threads(mat: torch.Tensor) -> Iterator[None]:
    """Run the enclosed LAPACK call on one CPU thread when `mat` is at most _SINGLE_THREAD_MAX on its short side."""
    threads = torch.get_num_threads()
    if mat.device.type != "cpu" or threads == 1 or min(mat.shape[-2:]) > _SINGLE_THREAD_MAX:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def left_svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (U [m, k], s [k], P [k, n]) with mat = U @ P, U orthonormal, rows of P orthogonal with norms s,
    sorted by decreasing s; k = min(m, n). P equals diag(s) @ Vh of the SVD."""
    m, n = mat.shape
    if m > n:
        with lapack_threads(mat):
            q, r = torch.linalg.qr(mat)  # q [m, n], r [n, n]
        u_r, s, p = left_svd(r)
        return q @ u_r, s, p
    gram = mat @ mat.transpose(0, 1)
    with lapack_threads(gram):
        evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    u = evecs
    p = u.transpose(0, 1) @ mat
    # The norms of P's rows are the singular values; they are more accurate than sqrt(evals) for small ones.
    s = torch.linalg.vector_norm(p, dim=1)
    order = torch.argsort(s, descending=True)
    return u[:, order], s[order], p[order]


# Below these sizes the exact factorization is cheap enough that a randomized one is not worth its slack.
_RANDOMIZED_MIN_SIZE = 768
_RANDOMIZED_MAX_FRACTION = 0.35


def left_svd_truncated(
    mat: torch.Tensor, rank: int, *, n_power: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The leading `rank` terms of left_svd(mat): (U [m, rank], s [rank], P [rank, n], discarded energy
    ||mat - U P||_F^2), with U orthonormal.

    For a large matrix and a small rank this uses a randomized range finder with power iterations (Halko et al.),
    about 4x cheaper than the full Gram eigendecomposition for a 3200 x 3200 matrix at rank 400. U is orthonormal
    either way, so the discarded energy ||mat||^2 - ||P||^2 is exact; only its optimality is approximate
    (within a hair of Eckart-Young for the decaying spectra of trained weights).
    """
    m, n = mat.shape
    k = min(m, n)
    if rank >= k or k < _RANDOMIZED_MIN_SIZE or rank > _RANDOMIZED_MAX_FRACTION * k:
        u, s, p = left_svd(mat)
        return u[:, :rank], s[:rank], p[:rank], float((s[rank:] ** 2).sum().item())
    oversample = min(k - rank, max(10, rank // 4))
    gen = torch.Generator(device=mat.device).manual_seed(0)  # deterministic decompositions
    omega = torch.randn(n, rank + oversample, generator=gen, device=mat.device, dtype=mat.dtype)
    y = mat @ omega
    with lapack_threads(y):
        q, _ = torch.linalg.qr(y)
    for _ in range(n_power):  # re-orthonormalize each half step to keep the small directions
        y = mat.transpose(0, 1) @ q
        with lapack_threads(y):
            q, _ = torch.linalg.qr(y)
        y = mat @ q
        with lapack_threads(y):
            q, _ = torch.linalg.qr(y)
    b = q.transpose(0, 1) @ mat  # [rank + p, n]
    u_b, s, p = left_svd(b)
    # Subtracting energies cancels badly only for tiny errors, which the exact branch handles.
    discarded = max(torch.linalg.norm(mat).item() ** 2 - (s[:rank] ** 2).sum().item(), 0.0)
    return q @ u_b[:, :rank], s[:rank], p[:rank], discarded

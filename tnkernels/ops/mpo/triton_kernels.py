"""Triton kernels for tensor-network contractions: a strided "mode product" and its weight-gradient reduction.

Both the MPO chain and the Tucker-2 1x1 projections are compositions of one contraction,

    out[p, n, q] = sum_k a[p, k, q] * b[k, n]          (+ bias[(p % BIAS_MOD) * N + n])

the product of a 3-way tensor with a matrix along its middle mode. For an MPO step, p runs over (rows, output modes
already produced), k over (bond in, input mode i_k), q over the input modes not yet consumed and n over (output mode
j_k, bond out); the permutation the torch path does with `.permute().contiguous()` is folded into the (p, q) -> address
arithmetic below, so every step reads and writes the row-major state directly. The backward needs the same kernel with
b transposed (strides swapped) for the input gradient, and the reduction

    db[k, n] = sum_{p, q} a[p, k, q] * g[p, n, q]

for the weight gradient. The kernels know nothing of modules or of MPO/Tucker; tnkernels/ops/*/triton_impl.py compose
them. Naming follows flash-linear-attention: i_* program ids, o_* offsets, m_* masks, p_* pointers, b_* blocks.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def gpu_configs(block_names: str, rows: list[tuple[int, ...]]) -> list[triton.Config]:
    """One triton.Config per row: the block sizes named by `block_names` (space-separated), then num_warps and
    num_stages."""
    names = block_names.split()
    return [triton.Config(dict(zip(names, row[: len(names)])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


# Several configs on a GPU; exactly one under TRITON_INTERPRET=1, where autotuning (do_bench) cannot run. The GPU lists
# are built everywhere so that tests can check them (tests/test_triton_mpo.py).
_GPU_MP_CONFIGS = gpu_configs(
    "BM BN BK",
    [
        (128, 64, 32, 4, 3),
        (64, 64, 32, 4, 4),
        (128, 128, 32, 8, 3),
        (64, 32, 64, 4, 3),
        (32, 64, 32, 4, 4),
        (256, 64, 32, 8, 3),
    ],
)
_GPU_GB_CONFIGS = gpu_configs(
    "BM BN BK", [(64, 64, 64, 4, 3), (128, 32, 32, 4, 3), (64, 128, 64, 8, 3), (128, 64, 32, 4, 4)]
)
_GPU_PAIR_CONFIGS = gpu_configs(
    "BM BK BR BN2", [(64, 32, 64, 64, 4, 3), (128, 32, 64, 64, 8, 3), (64, 64, 32, 128, 4, 3), (128, 32, 32, 32, 4, 4)]
)
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _MP_CONFIGS = [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=4)]
    _GB_CONFIGS = [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=4)]
    _PAIR_CONFIGS = [triton.Config({"BM": 16, "BK": 16, "BR": 16, "BN2": 16}, num_warps=4)]
else:  # pragma: no cover - GPU only
    _MP_CONFIGS, _GB_CONFIGS, _PAIR_CONFIGS = _GPU_MP_CONFIGS, _GPU_GB_CONFIGS, _GPU_PAIR_CONFIGS

# fp64 does not use tl.dot: _dot_acc materializes the [X, C, Y] broadcast product of every dot in registers. With the
# GPU configs above that is up to 128*32*128 = 524288 doubles (4 MiB) per program, far beyond a register file
# (64K 32-bit registers per SM): it would spill to local memory, if it compiled at all. fp64 exists for
# gradcheck, not speed: on a GPU it gets one small config per kernel instead, each broadcast <= 8192 doubles
# (64 per thread at 4 warps), the reduced dimension (C) being the short one.
FP64_MP_CONFIG = triton.Config({"BM": 32, "BN": 32, "BK": 8}, num_warps=4, num_stages=1)
FP64_GB_CONFIG = triton.Config({"BM": 8, "BN": 32, "BK": 32}, num_warps=4, num_stages=1)
FP64_PAIR_CONFIG = triton.Config({"BM": 32, "BK": 8, "BR": 8, "BN2": 32}, num_warps=4, num_stages=1)


def fp64_prune(fp64_config: triton.Config):
    """An autotune early_config_prune that keeps only `fp64_config` when the launch has DOT_FP64 (a constexpr kwarg,
    which triton passes to the pruner). Single-config autotuning (the interpreter) never calls it."""

    def prune(configs, named_args, **kwargs):
        return [fp64_config] if kwargs.get("DOT_FP64") else configs

    return prune


def _quick_bench(kernel_call, quantiles):
    """Autotune timing with short warmup/rep: the chain has many distinct (K, N) steps, and triton's default
    (25 ms + 100 ms per config) would spend minutes tuning a model's first forward."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# Row counts change with every batch; specializing on them (== 1, divisible by 16) would compile a new variant of
# each config per batch-size class for no gain, since they only feed masks and index division.
_NO_SPECIALIZE_MP = ["P", "M_BUCKET", "BIAS_MOD"]
_NO_SPECIALIZE_GB = ["P", "M_BUCKET", "M_PER_SPLIT"]


@triton.jit
def _dot_acc(b_x, b_y, acc, DOT_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + b_x @ b_y with the accumulator's precision.

    fp64 goes through a broadcast-and-sum (tl.dot has no fp64 path on every target); half types are upcast to fp32
    when UPCAST (the interpreter's bf16 dot returns garbage), otherwise they feed the tensor cores directly.
    """
    if DOT_FP64:
        # [BX, BC, 1] * [1, BC, BY] -> sum over BC -> [BX, BY]
        acc += tl.sum(b_x.to(tl.float64)[:, :, None] * b_y.to(tl.float64)[None, :, :], axis=1)
    elif UPCAST:
        # [BX, BC] @ [BC, BY] -> [BX, BY]
        acc = tl.dot(b_x.to(tl.float32), b_y.to(tl.float32), acc, input_precision=PRECISION)
    else:
        # [BX, BC] @ [BC, BY] -> [BX, BY]
        acc = tl.dot(b_x, b_y, acc, input_precision=PRECISION)
    return acc


@triton.autotune(
    configs=_MP_CONFIGS,
    key=["K", "N", "M_BUCKET"],
    do_bench=_quick_bench,
    prune_configs_by={"early_config_prune": fp64_prune(FP64_MP_CONFIG)},
)
@triton.jit(do_not_specialize=_NO_SPECIALIZE_MP)
def mode_product_kernel(
    p_a, p_b, p_bias, p_out,
    P, K, N, Q, M_BUCKET,
    s_ap, s_ak, s_aq,
    s_bk, s_bn,
    s_op, s_on, s_oq,
    BIAS_MOD,
    HAS_BIAS: tl.constexpr, DOT_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """out[p, n, q] = sum_k a[p, k, q] * b[k, n] (+ bias); grid (cdiv(P*Q, BM) * cdiv(N, BN),).

    M_BUCKET (a power of four >= P*Q, capped) only feeds the autotune key, so that row counts of one size
    class share a tuned config instead of retuning for every batch size.
    """
    # Both tile indices come from axis 0 (CUDA limit 2**31-1): N = j_k * r_k has no useful bound (a 128256-word
    # vocabulary mode times bond 32 is 4.1M columns, 128K blocks), and CUDA limits axes 1 and 2 to 65535. The N
    # blocks of one row block run next to each other, so they share that block of the big operand `a` in L2.
    i_mn = tl.program_id(0)
    n_blocks = tl.cdiv(N, BN)
    i_m = i_mn // n_blocks
    i_n = i_mn % n_blocks
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < P * Q
    m_n = o_n < N
    # Row m of the implicit [P*Q, K] matrix is (p, q) = divmod(m, Q): the state's permutation lives here.
    o_p = (o_m // Q).to(tl.int64)
    o_q = (o_m % Q).to(tl.int64)
    p_a_rows = p_a + o_p * s_ap + o_q * s_aq

    acc_dtype = tl.float64 if DOT_FP64 else tl.float32
    b_acc = tl.zeros((BM, BN), dtype=acc_dtype)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        # Masked loads fill 0 so padded lanes add nothing (the interpreter returns garbage for unmasked OOB).
        # o_k * s_ak in int64: for a feature-major view of x (x.t()), s_ak = rows * Q, so k * s_ak spans all of x,
        # which may exceed 2**31 elements while s_ak itself still fits the int32 that triton passes it as.
        b_a = tl.load(p_a_rows[:, None] + o_k[None, :].to(tl.int64) * s_ak, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_b = tl.load(p_b + o_k[:, None] * s_bk + o_n[None, :] * s_bn, mask=m_k[:, None] & m_n[None, :], other=0.0)
        # [BM, BK] @ [BK, BN] -> [BM, BN]
        b_acc = _dot_acc(b_a, b_b, b_acc, DOT_FP64, UPCAST, PRECISION)

    if HAS_BIAS:
        # Bias is indexed by the full output feature (p % BIAS_MOD, n): for an MPO's last step p = (row, J_done).
        o_f = (o_p[:, None] % BIAS_MOD) * N + o_n[None, :]
        b_bias = tl.load(p_bias + o_f, mask=m_m[:, None] & m_n[None, :], other=0.0)
        b_acc += b_bias.to(acc_dtype)

    p_o = p_out + o_p[:, None] * s_op + o_q[:, None] * s_oq + o_n[None, :].to(tl.int64) * s_on
    tl.store(p_o, b_acc.to(p_out.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.autotune(
    configs=_PAIR_CONFIGS,
    key=["K1", "R1", "I2", "N2", "M_BUCKET"],
    do_bench=_quick_bench,
    prune_configs_by={"early_config_prune": fp64_prune(FP64_PAIR_CONFIG)},
)
@triton.jit(do_not_specialize=_NO_SPECIALIZE_MP)
def mode_product_pair_kernel(
    p_a, p_b1, p_b2, p_bias, p_out,
    P, K1, J1, R1, I2, Q2, N2, M_BUCKET,
    s_ap, s_ak, s_aq,
    s_b1k, s_b1n,
    s_b2k, s_b2n,
    BIAS_MOD,
    HAS_BIAS: tl.constexpr, DOT_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BN2: tl.constexpr,
):  # fmt: skip
    """Two consecutive MPO steps in one kernel, the intermediate state never written to memory.

    Step 1: t[p, (j1, r), (i2, q)] = sum_k a[p, k, (i2, q)] * b1[k, (j1, r)]       (a: [P, K1, I2*Q2])
    Step 2: out[(p, j1), n, q] = sum_{r, i2} t[p, (j1, r), (i2, q)] * b2[(r, i2), n] (out: contiguous [P*J1, N2, Q2])
    Grid (cdiv(P*Q2, BM) * J1, cdiv(N2, BN2)): a program owns BM pairs (p, q) for one output mode j1 and loops over
    i2 and blocks of the bond r, so the [BM, BR] slice of t lives in registers only. The launcher picks this kernel
    when N2 fits one or two blocks (t is recomputed once per N2 block).
    """
    # J1 (an output mode, unbounded: 128256 for a vocabulary mode) is folded into axis 0, whose CUDA limit is 2**31-1,
    # not given an axis of its own (axes 1 and 2 are limited to 65535). j1 runs fastest, so the J1 programs that
    # read the same rows of `a` run together and share them in L2.
    i_mj, i_n = tl.program_id(0), tl.program_id(1)
    i_m = i_mj // J1
    i_j = i_mj % J1
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN2 + tl.arange(0, BN2)
    m_m = o_m < P * Q2
    m_n = o_n < N2
    o_p = (o_m // Q2).to(tl.int64)
    o_q = (o_m % Q2).to(tl.int64)
    in_dtype = p_out.dtype.element_ty
    acc_dtype = tl.float64 if DOT_FP64 else tl.float32

    b_acc = tl.zeros((BM, BN2), dtype=acc_dtype)
    for i2 in range(0, I2):
        p_a_rows = p_a + o_p * s_ap + (i2 * Q2 + o_q) * s_aq
        for r0 in range(0, R1, BR):
            o_r = r0 + tl.arange(0, BR)
            m_r = o_r < R1
            b_t = tl.zeros((BM, BR), dtype=acc_dtype)
            for k0 in range(0, K1, BK):
                o_k = k0 + tl.arange(0, BK)
                m_k = o_k < K1
                b_a = tl.load(
                    p_a_rows[:, None] + o_k[None, :].to(tl.int64) * s_ak,  # int64: see mode_product_kernel
                    mask=m_m[:, None] & m_k[None, :],
                    other=0.0,
                )
                b_b1 = tl.load(
                    p_b1 + o_k[:, None] * s_b1k + (i_j * R1 + o_r)[None, :] * s_b1n,
                    mask=m_k[:, None] & m_r[None, :],
                    other=0.0,
                )
                # [BM, BK] @ [BK, BR] -> [BM, BR]
                b_t = _dot_acc(b_a, b_b1, b_t, DOT_FP64, UPCAST, PRECISION)
            b_b2 = tl.load(
                p_b2 + (o_r * I2 + i2)[:, None] * s_b2k + o_n[None, :] * s_b2n,
                mask=m_r[:, None] & m_n[None, :],
                other=0.0,
            )
            # The intermediate is rounded to the input dtype exactly where the unfused path stores it.
            # [BM, BR] @ [BR, BN2] -> [BM, BN2]
            b_acc = _dot_acc(b_t.to(in_dtype), b_b2, b_acc, DOT_FP64, UPCAST, PRECISION)

    o_p2 = o_p * J1 + i_j
    if HAS_BIAS:
        o_f = (o_p2[:, None] % BIAS_MOD) * N2 + o_n[None, :]
        b_acc += tl.load(p_bias + o_f, mask=m_m[:, None] & m_n[None, :], other=0.0).to(acc_dtype)
    p_o = p_out + o_p2[:, None] * (N2 * Q2) + o_n[None, :].to(tl.int64) * Q2 + o_q[:, None]
    tl.store(p_o, b_acc.to(in_dtype), mask=m_m[:, None] & m_n[None, :])


@triton.autotune(
    configs=_GB_CONFIGS,
    key=["K", "N", "M_BUCKET"],
    do_bench=_quick_bench,
    prune_configs_by={"early_config_prune": fp64_prune(FP64_GB_CONFIG)},
)
@triton.jit(do_not_specialize=_NO_SPECIALIZE_GB)
def mode_product_grad_b_kernel(
    p_a, p_g, p_db,
    P, K, N, Q, M_BUCKET, M_PER_SPLIT,
    s_ap, s_ak, s_aq,
    s_gp, s_gn, s_gq,
    DOT_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """db[s, k, n] = sum over the s-th slice of (p, q) of a[p, k, q] * g[p, n, q]; grid (cdiv(K,BK)*cdiv(N,BN), S).

    The reduction runs over all rows, so it is split into S slices written to separate partial sums (summed by the
    launcher) to keep the GPU busy without atomics, which would make gradients non-deterministic. db is contiguous
    [S, K, N] in the accumulator dtype.
    """
    # The (k, n) tiles share axis 0 (N is unbounded, see mode_product_kernel); S <= 4 * SMs fits axis 1.
    i_kn, i_s = tl.program_id(0), tl.program_id(1)
    n_blocks = tl.cdiv(N, BN)
    i_k = i_kn // n_blocks
    i_n = i_kn % n_blocks
    o_k = i_k * BK + tl.arange(0, BK)
    o_n = i_n * BN + tl.arange(0, BN)
    m_k = o_k < K
    m_n = o_n < N
    acc_dtype = tl.float64 if DOT_FP64 else tl.float32
    b_acc = tl.zeros((BK, BN), dtype=acc_dtype)
    m_start = i_s * M_PER_SPLIT
    m_stop = tl.minimum(m_start + M_PER_SPLIT, P * Q)
    for m0 in range(m_start, m_stop, BM):
        o_m = m0 + tl.arange(0, BM)
        m_m = o_m < m_stop
        o_p = (o_m // Q).to(tl.int64)
        o_q = (o_m % Q).to(tl.int64)
        # a read transposed as [BK, BM] so the reduction index is the dot's inner dimension.
        b_at = tl.load(
            p_a + o_p[None, :] * s_ap + o_q[None, :] * s_aq + o_k[:, None].to(tl.int64) * s_ak,  # see mode_product
            mask=m_k[:, None] & m_m[None, :],
            other=0.0,
        )
        b_g = tl.load(
            p_g + o_p[:, None] * s_gp + o_q[:, None] * s_gq + o_n[None, :].to(tl.int64) * s_gn,
            mask=m_m[:, None] & m_n[None, :],
            other=0.0,
        )
        # [BK, BM] @ [BM, BN] -> [BK, BN]
        b_acc = _dot_acc(b_at, b_g, b_acc, DOT_FP64, UPCAST, PRECISION)
    p_o = p_db + i_s.to(tl.int64) * K * N + o_k[:, None] * N + o_n[None, :]
    tl.store(p_o, b_acc, mask=m_k[:, None] & m_n[None, :])

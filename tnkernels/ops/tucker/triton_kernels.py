"""Triton kernel for the Tucker-2 convolution: U_in projection fused into the core's implicit GEMM, with an optional
fused U_out projection + bias epilogue.

For a block of BM output pixels (n, oh, ow) and a block of BRO core output channels:

    for each tap (ky, kx):                       ih = oh*SH - PH + ky*DH, iw = ow*SW - PW + kx*DW
        for each block of BRI input ranks:
            proj[BM, BRI] = sum_c x[n, c, ih, iw] * U_in[c, r]       (zero where (ih, iw) falls in the padding)
            acc[BM, BRO] += proj @ core[:, r, ky, kx]^T

The R_in intermediate never leaves the chip; the price is recomputing the projection once per tap (the unfused path
writes and re-reads it instead). When one BRO block holds all of R_out, the epilogue also applies U_out and the bias
(y = acc @ U_out^T + b, looping over C_out blocks), so the R_out intermediate stays on chip too; it is written out
only when the backward needs it (WRITE_H). The 1x1 projections elsewhere reuse tnkernels/ops/mpo/triton_kernels.py.
Naming: i_* program ids, o_* offsets, m_* masks, p_* pointers, b_* blocks.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..mpo.triton_kernels import _dot_acc, _quick_bench, fp64_prune, gpu_configs

# Built everywhere so that tests can check them; used only on a GPU.
_GPU_CONFIGS = gpu_configs(
    "BM BC BRI BCO", [(64, 32, 32, 64, 4, 3), (128, 32, 32, 64, 8, 3), (64, 64, 64, 64, 4, 2), (32, 64, 32, 64, 4, 3)]
)
_GPU_GRAD_CONFIGS = gpu_configs("BM BRO BRI", [(64, 32, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 32, 4, 3)])

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _CONFIGS = [triton.Config({"BM": 16, "BC": 16, "BRI": 16, "BCO": 16}, num_warps=4)]
    _GRAD_CONFIGS = [triton.Config({"BM": 16, "BRO": 16, "BRI": 16}, num_warps=4)]
else:  # pragma: no cover - GPU only
    _CONFIGS, _GRAD_CONFIGS = _GPU_CONFIGS, _GPU_GRAD_CONFIGS

# One small config each for fp64 on a GPU (see FP64_MP_CONFIG): every [X, C, Y] broadcast of _dot_acc <= 8192 doubles.
# The fused kernel's BRO is set by the launcher (up to 128), so its other dims are small: [16, 4, 128] and
# [16, 128, 4]. grad_proj reduces over BRO and grad_core over BM, so those are the short dims.
FP64_FUSED_CONFIG = triton.Config({"BM": 16, "BC": 8, "BRI": 4, "BCO": 4}, num_warps=4, num_stages=1)
FP64_GRAD_PROJ_CONFIG = triton.Config({"BM": 32, "BRO": 8, "BRI": 32}, num_warps=4, num_stages=1)
FP64_GRAD_CORE_CONFIG = triton.Config({"BM": 8, "BRO": 32, "BRI": 32}, num_warps=4, num_stages=1)


@triton.autotune(
    configs=_CONFIGS,
    key=["C_IN", "R_IN", "R_OUT", "C_OUT", "KH", "KW", "M_BUCKET"],
    do_bench=_quick_bench,
    prune_configs_by={"early_config_prune": fp64_prune(FP64_FUSED_CONFIG)},
)
@triton.jit(do_not_specialize=["NB", "M_BUCKET"])  # batch size only feeds masks and index division
def tucker_fused_kernel(
    p_x, p_uin, p_core, p_uout, p_bias, p_h, p_y,
    NB, C_IN, H, W, R_IN, R_OUT, C_OUT, OH, OW, M_BUCKET,
    s_xn, s_xc, s_xh, s_xw,
    s_yn, s_yc, s_yh, s_yw,
    s_uc, s_ur,
    s_co, s_ci, s_cy, s_cx,
    s_uo, s_uor,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    FUSE_OUT: tl.constexpr, WRITE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BRO: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BRI: tl.constexpr, BCO: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(NB*OH*OW, BM), cdiv(R_OUT, BRO)). h: contiguous [NB, R_OUT, OH, OW]; y: [NB, C_OUT, OH, OW]
    with strides s_y* (NCHW or channels-last, following x as nn.Conv2d does). FUSE_OUT requires BRO >= R_OUT (one
    program column)."""
    i_m, i_ro = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < NB * OH * OW
    o_n = (o_m // (OH * OW)).to(tl.int64)
    o_oh = (o_m % (OH * OW)) // OW
    o_ow = o_m % OW
    o_ro = i_ro * BRO + tl.arange(0, BRO)
    m_ro = o_ro < R_OUT
    in_dtype = p_x.dtype.element_ty
    acc_dtype = tl.float64 if DOT_FP64 else tl.float32

    b_acc = tl.zeros((BM, BRO), dtype=acc_dtype)
    for ky in tl.static_range(KH):
        for kx in tl.static_range(KW):
            o_ih = o_oh * SH - PH + ky * DH
            o_iw = o_ow * SW - PW + kx * DW
            # Taps in the zero padding load nothing: a projected zero is zero, so padding commutes with U_in.
            m_pix = m_m & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0) & (o_iw < W)
            p_x_pix = p_x + o_n * s_xn + o_ih.to(tl.int64) * s_xh + o_iw.to(tl.int64) * s_xw
            for r0 in range(0, R_IN, BRI):
                o_ri = r0 + tl.arange(0, BRI)
                m_ri = o_ri < R_IN
                b_proj = tl.zeros((BM, BRI), dtype=acc_dtype)
                for c0 in range(0, C_IN, BC):
                    o_c = c0 + tl.arange(0, BC)
                    m_c = o_c < C_IN
                    # int64: with the channel dim outermost in memory (a permuted view), c * s_xc spans all of x.
                    b_x = tl.load(
                        p_x_pix[:, None] + o_c[None, :].to(tl.int64) * s_xc,
                        mask=m_pix[:, None] & m_c[None, :],
                        other=0.0,
                    )
                    b_u = tl.load(
                        p_uin + o_c[:, None] * s_uc + o_ri[None, :] * s_ur,
                        mask=m_c[:, None] & m_ri[None, :],
                        other=0.0,
                    )
                    # [BM, BC] @ [BC, BRI] -> [BM, BRI]
                    b_proj = _dot_acc(b_x, b_u, b_proj, DOT_FP64, UPCAST, PRECISION)
                # core[ro, ri, ky, kx] read as [BRI, BRO]
                b_k = tl.load(
                    p_core + o_ri[:, None] * s_ci + o_ro[None, :] * s_co + ky * s_cy + kx * s_cx,
                    mask=m_ri[:, None] & m_ro[None, :],
                    other=0.0,
                )
                # The projection is rounded to the input dtype, as the unfused path rounds its stored intermediate;
                # this keeps half-precision tiles on the tensor cores.
                # [BM, BRI] @ [BRI, BRO] -> [BM, BRO]
                b_acc = _dot_acc(b_proj.to(in_dtype), b_k, b_acc, DOT_FP64, UPCAST, PRECISION)

    o_pix = (o_oh * OW + o_ow).to(tl.int64)
    if WRITE_H:
        p_hb = p_h + o_n[:, None] * (R_OUT * OH * OW) + o_ro[None, :].to(tl.int64) * (OH * OW) + o_pix[:, None]
        tl.store(p_hb, b_acc.to(in_dtype), mask=m_m[:, None] & m_ro[None, :])
    if FUSE_OUT:
        b_h = b_acc.to(in_dtype)
        for co0 in range(0, C_OUT, BCO):
            o_co = co0 + tl.arange(0, BCO)
            m_co = o_co < C_OUT
            # U_out[co, ro] read as [BRO, BCO]
            b_uo = tl.load(
                p_uout + o_ro[:, None] * s_uor + o_co[None, :] * s_uo,
                mask=m_ro[:, None] & m_co[None, :],
                other=0.0,
            )
            b_y = tl.zeros((BM, BCO), dtype=acc_dtype)
            # [BM, BRO] @ [BRO, BCO] -> [BM, BCO]
            b_y = _dot_acc(b_h, b_uo, b_y, DOT_FP64, UPCAST, PRECISION)
            if HAS_BIAS:
                b_y += tl.load(p_bias + o_co, mask=m_co, other=0.0).to(acc_dtype)[None, :]
            o_ypix = o_oh.to(tl.int64) * s_yh + o_ow.to(tl.int64) * s_yw
            p_yb = p_y + o_n[:, None] * s_yn + o_co[None, :].to(tl.int64) * s_yc + o_ypix[:, None]
            tl.store(p_yb, b_y.to(in_dtype), mask=m_m[:, None] & m_co[None, :])


# ------------------------------------------------------------------------------------------------------------
# Backward through the k x k core convolution (h = core * p, with p = U_in^T x the projected input)


@triton.autotune(
    configs=_GRAD_CONFIGS,
    key=["R_IN", "R_OUT", "KH", "KW", "M_BUCKET"],
    do_bench=_quick_bench,
    prune_configs_by={"early_config_prune": fp64_prune(FP64_GRAD_PROJ_CONFIG)},
)
@triton.jit(do_not_specialize=["NB", "M_BUCKET"])
def tucker_grad_proj_kernel(
    p_dh, p_core, p_dp,
    NB, H, W, R_IN, R_OUT, OH, OW, M_BUCKET,
    s_co, s_ci, s_cy, s_cx,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    DOT_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BRO: tl.constexpr, BRI: tl.constexpr,
):  # fmt: skip
    """dp[n, ri, ih, iw] = sum_{ro, ky, kx} dh[n, ro, oh, ow] * core[ro, ri, ky, kx] over the (oh, ow) that tap
    (ky, kx) maps onto (ih, iw): the transposed convolution as an implicit GEMM. dh: contiguous [NB, R_OUT, OH, OW];
    dp: contiguous [NB, R_IN, H, W]. Grid (cdiv(NB*H*W, BM), cdiv(R_IN, BRI))."""
    i_m, i_ri = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < NB * H * W
    o_n = (o_m // (H * W)).to(tl.int64)
    o_ih = (o_m % (H * W)) // W
    o_iw = o_m % W
    o_ri = i_ri * BRI + tl.arange(0, BRI)
    m_ri = o_ri < R_IN
    acc_dtype = tl.float64 if DOT_FP64 else tl.float32
    b_acc = tl.zeros((BM, BRI), dtype=acc_dtype)
    for ky in tl.static_range(KH):
        for kx in tl.static_range(KW):
            # ih = oh*SH - PH + ky*DH  <=>  oh = (ih + PH - ky*DH) / SH, valid only when that divides exactly.
            # Negative numerators are clamped before dividing so C-style and floor division agree.
            t_h = o_ih + PH - ky * DH
            t_w = o_iw + PW - kx * DW
            t_hc = tl.where(t_h >= 0, t_h, 0)
            t_wc = tl.where(t_w >= 0, t_w, 0)
            o_oh = t_hc // SH
            o_ow = t_wc // SW
            m_pix = m_m & (t_h >= 0) & (t_w >= 0) & (t_hc % SH == 0) & (t_wc % SW == 0) & (o_oh < OH) & (o_ow < OW)
            p_dh_pix = p_dh + o_n * (R_OUT * OH * OW) + (o_oh * OW + o_ow).to(tl.int64)
            for ro0 in range(0, R_OUT, BRO):
                o_ro = ro0 + tl.arange(0, BRO)
                m_ro = o_ro < R_OUT
                b_dh = tl.load(
                    p_dh_pix[:, None] + o_ro[None, :].to(tl.int64) * (OH * OW),
                    mask=m_pix[:, None] & m_ro[None, :],
                    other=0.0,
                )
                b_k = tl.load(
                    p_core + o_ro[:, None] * s_co + o_ri[None, :] * s_ci + ky * s_cy + kx * s_cx,
                    mask=m_ro[:, None] & m_ri[None, :],
                    other=0.0,
                )
                # [BM, BRO] @ [BRO, BRI] -> [BM, BRI]
                b_acc = _dot_acc(b_dh, b_k, b_acc, DOT_FP64, UPCAST, PRECISION)
    p_o = p_dp + o_n[:, None] * (R_IN * H * W) + o_ri[None, :].to(tl.int64) * (H * W) + (o_ih * W + o_iw)[:, None]
    tl.store(p_o, b_acc.to(p_dp.dtype.element_ty), mask=m_m[:, None] & m_ri[None, :])


@triton.autotune(
    configs=_GRAD_CONFIGS,
    key=["R_IN", "R_OUT", "KH", "KW", "M_BUCKET"],
    do_bench=_quick_bench,
    prune_configs_by={"early_config_prune": fp64_prune(FP64_GRAD_CORE_CONFIG)},
)
@triton.jit(do_not_specialize=["NB", "M_BUCKET", "M_PER_SPLIT"])
def tucker_grad_core_kernel(
    p_dh, p_p, p_dcore,
    NB, H, W, R_IN, R_OUT, OH, OW, M_BUCKET, M_PER_SPLIT,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    DOT_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BRO: tl.constexpr, BRI: tl.constexpr,
):  # fmt: skip
    """dcore[s, ro, ri, tap] = sum over the s-th slice of output pixels of dh[n, ro, oh, ow] * p[n, ri, ih, iw],
    (ih, iw) = (oh*SH - PH + ky*DH, ow*SW - PW + kx*DW) for tap = ky*KW + kx. dh: contiguous [NB, R_OUT, OH, OW];
    p: contiguous [NB, R_IN, H, W]; dcore: contiguous [S, R_OUT, R_IN, KH*KW] in the accumulator dtype (partial sums
    per slice, added by the launcher: deterministic, no atomics). Grid (cdiv(R_OUT, BRO), cdiv(R_IN, BRI),
    KH*KW*S)."""
    i_ro, i_ri, i_ts = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tap = i_ts % (KH * KW)
    i_s = i_ts // (KH * KW)
    ky = tap // KW
    kx = tap % KW
    o_ro = i_ro * BRO + tl.arange(0, BRO)
    o_ri = i_ri * BRI + tl.arange(0, BRI)
    m_ro = o_ro < R_OUT
    m_ri = o_ri < R_IN
    acc_dtype = tl.float64 if DOT_FP64 else tl.float32
    b_acc = tl.zeros((BRO, BRI), dtype=acc_dtype)
    m_start = i_s * M_PER_SPLIT
    m_stop = tl.minimum(m_start + M_PER_SPLIT, NB * OH * OW)
    for m0 in range(m_start, m_stop, BM):
        o_m = m0 + tl.arange(0, BM)
        m_m = o_m < m_stop
        o_n = (o_m // (OH * OW)).to(tl.int64)
        o_oh = (o_m % (OH * OW)) // OW
        o_ow = o_m % OW
        o_ih = o_oh * SH - PH + ky * DH
        o_iw = o_ow * SW - PW + kx * DW
        m_pix = m_m & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0) & (o_iw < W)
        # dh read transposed as [BRO, BM] so the pixel index is the dot's inner dimension.
        b_dht = tl.load(
            p_dh + o_n[None, :] * (R_OUT * OH * OW) + o_ro[:, None].to(tl.int64) * (OH * OW)
            + (o_oh * OW + o_ow)[None, :],
            mask=m_ro[:, None] & m_m[None, :],
            other=0.0,
        )  # fmt: skip
        b_p = tl.load(
            p_p + o_n[:, None] * (R_IN * H * W) + o_ri[None, :].to(tl.int64) * (H * W) + (o_ih * W + o_iw)[:, None],
            mask=m_pix[:, None] & m_ri[None, :],
            other=0.0,
        )
        # [BRO, BM] @ [BM, BRI] -> [BRO, BRI]
        b_acc = _dot_acc(b_dht, b_p, b_acc, DOT_FP64, UPCAST, PRECISION)
    p_o = p_dcore + ((i_s.to(tl.int64) * R_OUT + o_ro[:, None]) * R_IN + o_ri[None, :]) * (KH * KW) + tap
    tl.store(p_o, b_acc, mask=m_ro[:, None] & m_ri[None, :])

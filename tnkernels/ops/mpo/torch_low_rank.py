"""Low-rank chains, modes (in, 1) x (1, out), swept from the left: two GEMMs on views of the cores.

This is the plan the planner picks for such a chain (`sweep-left`: h = x A, then y = h B), run without the
generic executor's bookkeeping. `torch_impl.run_grouped` computes the same thing, but its per-step reshapes,
transposes and layout logic cost ~25 us of Python per call, which a low-rank chain never needs; at small row
counts that overhead was larger than the GEMMs (512x1000 at rank 21, one row, one thread: 77 us a call against
19 us for two plain GEMMs). The backward is the reverse sweep of the same plan: dh = dy B^T, then dA = x^T dh,
dB = h^T dy and dx = dh A^T; dA is laid out for the CPU BLAS's fast case (see _grad_a).
"""

from __future__ import annotations

import torch

from ...plan.cache import planned_rows
from ...plan.mpo import MPODecision
from . import thin_bounds, thin_native

# The per-call choices below compare the row count with bounds through planned_rows: under torch.compile they
# then guard only on its bucket, and under torch.export they never narrow a dynamic row count's range.


def is_low_rank_chain(shapes) -> bool:
    """Core shapes (1, in, 1, r), (r, 1, out, 1): modes (in, 1) x (1, out)."""
    return len(shapes) == 2 and shapes[0][2] == 1 and shapes[1][1] == 1


def applies(shapes: tuple[tuple[int, int, int, int], ...], decision: MPODecision) -> bool:
    """True for a low-rank chain whose planned forward and backward are both the left sweep."""
    if not is_low_rank_chain(shapes):
        return False
    backward = decision.backward
    return decision.forward.kind == "sweep-left" and (backward is None or backward.kind == "sweep-left")


def factors(cores) -> tuple[torch.Tensor, torch.Tensor]:
    """A[in, r] and B[r, out]: views of G_1 (1, in, 1, r) and G_2 (r, 1, out, 1) when they are contiguous."""
    g1, g2 = cores
    return g1.reshape(g1.shape[1], g1.shape[3]), g2.reshape(g2.shape[0], g2.shape[2])


# The gradient of A can be computed as x^T dh (contiguous, in the parameter's layout) or as (dh^T x)^T, whose GEMM
# has the thin side as M, which the CPU BLAS runs much faster at enough rows, but whose transposed result autograd
# then copies into the parameter's layout (in * r numbers). Which wins depends on rows, rank and the CPU: the
# Xeon VM (one thread, 2026-12-01) measured 0.30-0.52x at 16 rows at every rank 4-105, 1.53x at 64 rows at rank
# 4 but 0.60-0.85x from rank 8, and 1.02-2.97x from 512 rows up to rank 105-153; the EPYC VM (2026-12-02) 1.9x
# already at 64 rows at rank 19. thin_bounds measures it with the native kernels' bounds ("grad_a_t"). The
# forward product x A needs no such care on torch: x @ A is as fast as or faster than every other layout at
# 1-1024 rows, ranks 1-96 (Xeon, 2026-12-01).
def _transposed_grad_a_wins(rows: int, rank: int, n_in: int) -> bool:
    return thin_bounds.bounds().wins("grad_a_t", rows, rank, n_in)


def _first_gemm(x2d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return thin_native.project(x2d, a)  # x2d @ a, on the native kernel at ranks <= 8


def _grad_a(x2d: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    rows, rank = planned_rows(dh.shape[0]), dh.shape[1]
    native = thin_native.grad_a(x2d, dh)  # x^T dh on thin_reduce, where it beats both layouts below
    if native is not None:
        return native
    if dh.device.type == "cpu" and _transposed_grad_a_wins(rows, rank, x2d.shape[1]):
        # in the parameter's layout: autograd would copy the transposed view anyway, and DDP warns about it
        return (dh.t() @ x2d).t().contiguous()
    return x2d.t() @ dh


# The CPU addmm writes the broadcast bias into the output and then runs the GEMM with beta = 1: two passes over an
# output that, at high ratios, is most of the bytes the layer moves. Appending the bias to B as one more row, and a
# column of ones to h, makes it a single GEMM that writes the output once. Measured (one thread, 2026-12-01):
# 1024 rows, 1536 outputs, rank 4: 460 -> 276 us; 3072 outputs, rank 19: 1302 -> 754 us; 256 rows, 3072 outputs,
# rank 4: 233 -> 154 us; through MPOLinear at 1024 rows, forward 1.28-1.43x at ratios 16 and 64 on the grid's
# wide-output layers (forward+backward: see LowRankFunction). It loses where the output is small (0.66x at 128 x 384 in
# isolation; in MPOLinear at 64 x 3072, rank 38: 0.85x) or the rank is high (the extra copies of h and B grow
# with it; 0.85-1.06x from rank 153 up), hence the bounds below.
_FOLD_MAX_RANK = 64
_FOLD_MIN_OUTPUT = 1 << 18
_ADD_IN_PLACE_MIN_ROWS = 8  # mm then add_(bias) instead of addmm from this many rows (see _second_gemm)


def _folds(rows: int, rank: int, out_features: int) -> bool:
    return rank <= _FOLD_MAX_RANK and rows * out_features >= _FOLD_MIN_OUTPUT


def _fold_bias(h: torch.Tensor, b: torch.Tensor) -> bool:
    return h.device.type == "cpu" and _folds(planned_rows(h.shape[0]), h.shape[1], b.shape[1])


def _with_ones(h: torch.Tensor) -> torch.Tensor:
    """[h, 1]: h with a column of ones appended, the left operand of a GEMM whose B carries the bias as a row."""
    rows, rank = h.shape
    h1 = h.new_empty(rows, rank + 1)
    h1[:, :rank] = h
    h1[:, rank] = 1
    return h1


def _second_gemm(h: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = h B + bias, and the left operand the GEMM used: [h, 1] when the bias rode in it, else h."""
    if bias is None:
        return h @ b, h
    y = thin_native.expand_with_bias(h, b, bias)  # ranks <= 8: one native pass, bias included
    if y is not None:
        return y, h
    if _fold_bias(h, b):
        h1 = _with_ones(h)
        return h1 @ torch.cat([b, bias[None]], 0), h1
    # The CPU addmm copies the broadcast bias into the output before its GEMM (beta = 1), a pass that costs more
    # than adding the bias to the fresh product in place: 1.03-1.27x from 8 rows up (64 x 1000 at rank 21: 24 ->
    # 20 us; 1024 rows: 493 -> 386 us), level at high ranks. At one row addmm's single call is ~0.2 us cheaper.
    if planned_rows(h.shape[0]) >= _ADD_IN_PLACE_MIN_ROWS and h.device.type == "cpu":
        return torch.mm(h, b).add_(bias), h
    return torch.addmm(bias, h, b), h


# ------------------------------------------------------------------------------------------- the C++ Function
# csrc/low_rank.cpp runs LowRankFunction's forward and backward from C++: the same products, without the Python
# autograd node and the dozen tensor calls its backward makes from Python (~2 us each at one row). Training step,
# one thread, against LowRankFunction (bench/low_rank_fn_ab.py has the command and the table). The choices the
# Python Function makes per call (native kernels, bias fold, dA layout) are made here once per input shape, by
# the same predicates, and passed to C++ as bit flags (the values below are csrc/low_rank.cpp's).
PROJECT_NATIVE = 1  # x A on thin_project
EXPAND_NATIVE = 2  # h B + bias on thin_expand
FOLD_BIAS = 4  # the bias as one more row of B (see _fold_bias)
ADD_IN_PLACE = 8  # mm(h, B).add_(bias) instead of addmm
DH_NATIVE = 16  # dy B^T on thin_project
GRAD_A_TRANSPOSED = 32  # dA as (dh^T x)^T
DX_NATIVE = 64  # dh A^T on thin_expand
DB_NATIVE = 128  # h^T dy on thin_reduce
DA_NATIVE = 256  # x^T dh on thin_reduce (before GRAD_A_TRANSPOSED)

# each native kernel's flag and its row in thin_bounds' table
_NATIVE_FLAGS = (
    (PROJECT_NATIVE, "project"),
    (EXPAND_NATIVE, "expand"),
    (DH_NATIVE, "project_t"),
    (DX_NATIVE, "expand_t"),
    (DB_NATIVE, "reduce"),
    (DA_NATIVE, "grad_a"),
)
_IN_WIDTH = ("project", "expand_t", "grad_a")  # products whose long side is the input width, the rest the output

_HAS_CPP = thin_native._HAS_THIN and hasattr(thin_native._ext, "low_rank_linear")
cpp_enabled = _HAS_CPP  # a switch for A/B timing and for tests of the Python Function


def plan_flags(rows: int, in_features: int, rank: int, out_features: int) -> int:
    """The flags for csrc/low_rank.cpp that reproduce LowRankFunction's per-call choices on a CPU input of `rows`
    rows. Each flag is a permission: the C++ side still checks dtype and layout before it runs a native kernel,
    and ignores the bias flags on a layer without bias (so the flags need not know whether it has one)."""
    table = thin_bounds.bounds()
    flags = ADD_IN_PLACE if rows >= _ADD_IN_PLACE_MIN_ROWS else 0
    if thin_native.enabled:
        for flag, kind in _NATIVE_FLAGS:
            if table.wins(kind, rows, rank, in_features if kind in _IN_WIDTH else out_features):
                flags |= flag
    if table.wins("grad_a_t", rows, rank, in_features):
        flags |= GRAD_A_TRANSPOSED
    if _folds(rows, rank, out_features):
        flags |= FOLD_BIAS
    return flags


def cpp_flags(x2d: torch.Tensor, cores) -> int | None:
    """plan_flags for a call on x2d, or None where it runs on the Python side (LowRankFunction, low_rank_apply):
    the extension is not built, the input is not on the CPU (the only device the C++ side was measured on),
    torch.compile is tracing (C++ calls are opaque to it: a graph break), or a core is not contiguous."""
    if not (_HAS_CPP and x2d.device.type == "cpu" and not torch.compiler.is_compiling()):
        return None
    g1, g2 = cores
    if not (g1.is_contiguous() and g2.is_contiguous()):
        return None
    return plan_flags(x2d.shape[0], g1.shape[1], g2.shape[0], g2.shape[2])


def low_rank_train(x2d: torch.Tensor, cores, bias: torch.Tensor | None, save_h: bool, flags: int | None):
    """y = (x A) B + bias under autograd: on the C++ Function when `flags` (from cpp_flags) is not None, else
    on LowRankFunction. Both run the same products. The switch cpp_enabled is read here, not in cpp_flags, so
    that it also takes effect on routes remembered before it was flipped."""
    if flags is None or not cpp_enabled:
        return LowRankFunction.apply(x2d, bias, save_h, *cores)
    return thin_native._ext.low_rank_linear(x2d, cores[0], cores[1], bias, save_h, flags)


def low_rank_forward(x2d: torch.Tensor, cores, bias: torch.Tensor | None) -> torch.Tensor:
    """Inference: y = (x A) B + bias."""
    a, b = factors(cores)
    return low_rank_apply(x2d, a, b, bias)


def low_rank_apply(
    x2d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, flags: int | None = None
) -> torch.Tensor:
    """Inference on the factors themselves (see factors): y = (x A) B + bias; in one C++ call when `flags` (from
    cpp_flags) is not None. At one row that saves the Python between the products: MPOLinear 512 -> 1000 at rank
    5, a one-row no-grad call, one thread, EPYC VM: 11.3 -> 6.3 us (bench/low_rank_fn_ab.py)."""
    if flags is not None and cpp_enabled:
        return thin_native._ext.low_rank_forward(x2d, a, b, bias, flags)
    return _second_gemm(_first_gemm(x2d, a), b, bias)[0]


class LowRankFunction(torch.autograd.Function):
    """y = (x A) B + bias with the left sweep's backward; h = x A is saved unless `save_h` is False (the
    planner's recompute option), in which case the backward recomputes it (one GEMM).

    Where the bias rides in the second GEMM (_fold_bias), h is kept with its column of ones, and the backward's
    [h, 1]^T dy gives dB and the bias gradient in one GEMM, instead of dB plus a separate pass over dy for the
    bias. GPT-2 768->3072 at ratio 64, 1024 rows, forward+backward: 2.84 ms against 3.97 ms without any folding
    (1.40x), where folding the forward alone had given 1.11x (one thread, 2026-12-01). Where the native kernel
    wrote the bias instead (ranks <= 8, thin_native), the backward appends the ones itself (a copy of h, rows x
    (r + 1) numbers) for the same single GEMM."""

    @staticmethod
    def forward(ctx, x2d, bias, save_h: bool, g1, g2):
        a, b = factors((g1, g2))
        h = _first_gemm(x2d, a)
        ctx.ones_in_backward = bias is not None and _fold_bias(h, b)  # dB and the bias gradient from [h, 1]^T dy
        y, h = _second_gemm(h, b, bias)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2d, g1, g2, h if save_h else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, g1, g2, h = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: see _differentiable_backward
            return _differentiable_backward(ctx, dy, x2d, g1, g2)
        # dy often arrives expanded (stride 0, from a sum or mean); the BLAS takes a slow path on such operands
        # (h^T dy: 120 us instead of 12 at one row, rank 76, 384 outputs), so materialize it once
        dy = dy.contiguous()
        a, b = factors((g1, g2))
        need_x, need_bias, _, need_g1, need_g2 = ctx.needs_input_grad
        rank = b.shape[0]
        dh = thin_native.project(dy, b.t()) if (need_x or need_g1) else None  # dy B^T
        d_g1 = _grad_a(x2d, dh).view(g1.shape) if need_g1 else None
        d_g2 = d_bias = None
        if need_g2:
            if h is None:
                h = _first_gemm(x2d, a)
            if ctx.ones_in_backward and h.shape[1] == rank:
                h = _with_ones(h)
            d_b = thin_native.reduce(h, dy)  # h^T dy, [rank (+ 1), out]: with the ones column, + the bias gradient
            d_g2 = (d_b[:rank] if d_b.shape[0] > rank else d_b).view(g2.shape)  # a slice costs ~1.5 us at 1 row
            if ctx.ones_in_backward and need_bias:
                d_bias = d_b[rank]
        dx = thin_native.expand_transposed(dh, a) if need_x else None  # dh A^T
        if ctx.has_bias and need_bias and d_bias is None:
            d_bias = dy.sum(0)
        return dx, d_bias, None, d_g1, d_g2


def _differentiable_backward(ctx, dy, x2d, g1, g2):
    """The backward for create_graph=True, in plain torch ops on the saved inputs: the saved h and the native
    kernels are constants to autograd, so a gradient of their results would silently lose terms. The same
    formulas (dh = dy B^T, dx = dh A^T, dA = x^T dh, dB = (x A)^T dy), each differentiable: exact to any order."""
    a, b = factors((g1, g2))
    need_x, need_bias, _, need_g1, need_g2 = ctx.needs_input_grad
    dh = dy @ b.t() if (need_x or need_g1) else None
    dx = dh @ a.t() if need_x else None
    d_g1 = (x2d.t() @ dh).view(g1.shape) if need_g1 else None
    d_g2 = ((x2d @ a).t() @ dy).view(g2.shape) if need_g2 else None
    d_bias = dy.sum(0) if (ctx.has_bias and need_bias) else None
    return dx, d_bias, None, d_g1, d_g2

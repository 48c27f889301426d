// Native CPU kernels for the two GEMMs of a low-rank layer, y = (x A) B + bias, when the rank r is small
// (ratio-64 layers: r = 4-10). The CPU BLAS runs them as ordinary GEMMs at about half the memory bandwidth (one
// thread, 1024 rows, 1536 -> 384 at rank 4: x A takes ~400 us, reading x once ~210 us) and its addmm writes the
// broadcast bias into the output before a beta = 1 GEMM re-reads it. Both products are memory-bound at these ranks,
// so what matters is reading the big operand once, in order, and writing the output once.
//
//   thin_project:  C[M, r] = X[M, K] A[K, r]         (x A; in the backward dy B^T, with A = B.t())
//   thin_expand:   Y[M, N] = H[M, r] B[r, N] + bias  (h B + bias; in the backward dh A^T, with B = A^T, no bias)
//   thin_reduce:   O[r, N] = H[M, r]^T D[M, N]        (the backward's dB = h^T dy; with H = [h, 1], also dbias;
//                  or O^T, [N, r]: dA = x^T dh with H = dh, D = x)
//
// fp32 only; X and H row-major contiguous (the Python side checks and falls back to torch otherwise); A and B of any
// strides, copied once into the layout the kernels read where they are not in it.
// Portable GCC/Clang vector extensions, as in mpo_chain.cpp: 16 floats per vector where AVX-512 is available, 8
// elsewhere. Measured against torch (MKL) in docs/native.md; where these lose (larger ranks: the dot tile below
// re-streams its operands from L2 and reaches half the FMA rate) the caller keeps torch.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;
constexpr int kProjectJB = 4;  // 4 rows x 4 ranks = 16 accumulators (+4 rows of x, +1 of A^T) of 32 registers
#else
constexpr int VW = 8;
constexpr int kProjectJB = 2;  // 4 x 2 = 8 accumulators (+4 +1) of 16 registers
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4), may_alias));  // unaligned, aliasing-safe

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline vf splat(float s) { return vf{} + s; }
inline float hsum(vf v) {
  for (int half = VW / 2; half >= 1; half /= 2)
    for (int i = 0; i < half; ++i) v[i] += v[i + half];
  return v[0];
}

// Calls f.template operator()<N>() with N = n known at compile time (1 <= n <= Max): the remainder of a blocking
// (r = 7 in groups of 4 leaves 3) keeps its accumulators in registers.
template <int Max, typename F>
inline void with_block(int64_t n, F&& f) {
  if constexpr (Max >= 1) {
    if (n == Max)
      f.template operator()<Max>();
    else
      with_block<Max - 1>(n, f);
  }
}

inline int64_t grain_for(int64_t units, int64_t fma_per_unit) {
  if (units * fma_per_unit < kMinParallelFma) return units;  // one chunk: no parallel region
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, fma_per_unit));
}

// ---- project: C[i, j] = <X[i, :], Wt[j, :]> with Wt = A^T ---------------------------------------------------------
// RB rows of X against JB rows of Wt: each X vector loaded serves JB ranks, each Wt vector RB rows; the RB x K
// block of X (4 x 1536 floats = 24 KB) stays in L1 while the rank groups pass over it, so X leaves memory once.
constexpr int kProjectRB = 4;

template <int RB, int JB>
inline void project_tile(const float* X, int64_t K, const float* Wt, float* C, int64_t r) {
  vf acc[RB][JB];
  for (int a = 0; a < RB; ++a)
    for (int b = 0; b < JB; ++b) acc[a][b] = vf{};
  int64_t k = 0;
  for (; k + VW <= K; k += VW) {
    vf xv[RB];
    for (int a = 0; a < RB; ++a) xv[a] = load(X + a * K + k);
    for (int b = 0; b < JB; ++b) {
      const vf w = load(Wt + b * K + k);
      for (int a = 0; a < RB; ++a) acc[a][b] += xv[a] * w;
    }
  }
  for (int a = 0; a < RB; ++a)
    for (int b = 0; b < JB; ++b) {
      float s = hsum(acc[a][b]);
      for (int64_t t = k; t < K; ++t) s += X[a * K + t] * Wt[b * K + t];
      C[a * r + b] = s;
    }
}

template <int RB>
void project_rows(const float* X, int64_t K, const float* Wt, float* C, int64_t r) {
  for (int64_t j = 0; j < r; j += kProjectJB)
    with_block<kProjectJB>(std::min<int64_t>(kProjectJB, r - j),
                           [&]<int JB>() { project_tile<RB, JB>(X, K, Wt + j * K, C + j, r); });
}

// ---- expand: Y[i, :] = bias + sum_j H[i, j] B[j, :] ---------------------------------------------------------------
// Each output vector is written once with the bias already in it. Columns go in blocks whose B slice (r x cols)
// fits in L1 while every row passes over it; at small ranks that is the whole row, which measured faster than
// 256-column blocks (1024 x 1536 outputs, rank 4: 249 against 355 us): the output is then written as whole rows.
constexpr int kExpandRB = 4;                  // 4 rows x 2 vectors = 8 accumulators
constexpr int64_t kExpandL1Bytes = 32 * 1024;  // budget for the B slice

template <int RB>
inline void expand_tile(const float* H, int64_t r, const float* B, int64_t N, const float* bias, float* Y,
                        int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 2 * VW <= c1; c += 2 * VW) {
    const vf b0 = bias ? load(bias + c) : vf{}, b1 = bias ? load(bias + c + VW) : vf{};
    vf acc[RB][2];
    for (int a = 0; a < RB; ++a) acc[a][0] = b0, acc[a][1] = b1;
    for (int64_t j = 0; j < r; ++j) {
      const vf p0 = load(B + j * N + c), p1 = load(B + j * N + c + VW);
      for (int a = 0; a < RB; ++a) {
        const vf h = splat(H[a * r + j]);
        acc[a][0] += h * p0;
        acc[a][1] += h * p1;
      }
    }
    for (int a = 0; a < RB; ++a) store(Y + a * N + c, acc[a][0]), store(Y + a * N + c + VW, acc[a][1]);
  }
  for (; c < c1; ++c)
    for (int a = 0; a < RB; ++a) {
      float s = bias ? bias[c] : 0.f;
      for (int64_t j = 0; j < r; ++j) s += H[a * r + j] * B[j * N + c];
      Y[a * N + c] = s;
    }
}

void expand_rows(const float* H, int64_t r, const float* B, int64_t N, const float* bias, float* Y, int64_t m0,
                 int64_t m1) {
  const int64_t fit = kExpandL1Bytes / (4 * std::max<int64_t>(1, r)) / (2 * VW) * (2 * VW);
  const int64_t cols = std::max<int64_t>(2 * VW, fit);
  for (int64_t c0 = 0; c0 < N; c0 += cols) {
    const int64_t c1 = std::min(N, c0 + cols);
    int64_t i = m0;
    for (; i + kExpandRB <= m1; i += kExpandRB) expand_tile<kExpandRB>(H + i * r, r, B, N, bias, Y + i * N, c0, c1);
    for (; i < m1; ++i) expand_tile<1>(H + i * r, r, B, N, bias, Y + i * N, c0, c1);
  }
}

// ---- reduce: Out[j, c] = sum_i H[i, j] D[i, c] (dB = h^T dy) ------------------------------------------------------
// A reduction over the rows, so the output is split by columns: each strip of 2 vectors of columns keeps JB ranks'
// sums in registers while it walks down all rows of D (a constant stride the prefetchers follow), and every strip
// is its own work item (no two threads write the same output). Ranks beyond JB take another pass over the strip,
// which then comes from L2. With H = [h, 1] the last output row is the column sums of D: the bias gradient.
#if defined(__AVX512F__)
constexpr int kReduceJB = 12;  // 12 ranks x 2 vectors = 24 accumulators (+2 of D, +1 splat) of 32 registers
#else
constexpr int kReduceJB = 6;  // 6 x 2 = 12 (+3) of 16
#endif

// Out is [r, N] (ld = N), or [N, r] when `transposed` (the backward's dA = x^T dh in the parameter's layout): the
// transposed stores happen once per strip, not per row.
template <int JB>
inline void reduce_strip(const float* H, int64_t M, int64_t r, const float* D, int64_t N, int64_t c, float* Out,
                         bool transposed) {
  vf acc[JB][2];
  for (int b = 0; b < JB; ++b) acc[b][0] = acc[b][1] = vf{};
  for (int64_t i = 0; i < M; ++i) {
    const vf d0 = load(D + i * N + c), d1 = load(D + i * N + c + VW);
    for (int b = 0; b < JB; ++b) {
      const vf hs = splat(H[i * r + b]);
      acc[b][0] += hs * d0;
      acc[b][1] += hs * d1;
    }
  }
  if (!transposed) {
    for (int b = 0; b < JB; ++b) store(Out + b * N + c, acc[b][0]), store(Out + b * N + c + VW, acc[b][1]);
    return;
  }
  for (int b = 0; b < JB; ++b)
    for (int lane = 0; lane < VW; ++lane) {
      Out[(c + lane) * r + b] = acc[b][0][lane];
      Out[(c + VW + lane) * r + b] = acc[b][1][lane];
    }
}

// the last N % (2 VW) columns, one at a time
void reduce_tail(const float* H, int64_t M, int64_t r, const float* D, int64_t N, int64_t c0, float* Out,
                 bool transposed) {
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = c0; c < N; ++c) {
      float s = 0.f;
      for (int64_t i = 0; i < M; ++i) s += H[i * r + j] * D[i * N + c];
      Out[transposed ? c * r + j : j * N + c] = s;
    }
}

// a^T as a contiguous [cols, rows] matrix for a 2-D fp32 a of any strides. ATen's copy of a transposed view goes
// element by element through its generic iterator: 10 us for a 1536 x 4 matrix on the EPYC VM (2026-12-02), more
// than the kernel that reads it at a few rows. Rows of a are read in order and its few columns written as
// streams, which takes a fraction of that.
at::Tensor transposed_copy(const at::Tensor& a) {
  const int64_t R = a.size(0), C = a.size(1), sr = a.stride(0), sc = a.stride(1);
  at::Tensor t = at::empty({C, R}, a.options());
  const float* A = a.data_ptr<float>();
  float* T = t.data_ptr<float>();
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) T[j * R + i] = A[i * sr + j * sc];
  return t;
}

void check_fp32_matrix(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), fn, ": ",
              name, " must be a contiguous 2-D float32 CPU tensor");
}

}  // namespace

// a: [K, r] with any strides; the kernel reads A^T, so a transposed view of a contiguous [r, K] tensor (B.t() in the
// backward) costs no copy, and A itself one copy of K * r numbers.
at::Tensor thin_project(const at::Tensor& x, const at::Tensor& a) {
  check_fp32_matrix(x, "thin_project", "x");
  TORCH_CHECK(a.dim() == 2 && a.device().is_cpu() && a.scalar_type() == at::kFloat,
              "thin_project: a must be a 2-D float32 CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), r = a.size(1);
  TORCH_CHECK(a.size(0) == K, "thin_project: x has ", K, " columns, a has ", a.size(0), " rows");
  at::Tensor c = at::empty({M, r}, x.options());
  if (M == 0 || r == 0) return c;
  const at::Tensor wt = a.t().is_contiguous() ? a.t() : transposed_copy(a);
  const float* X = x.data_ptr<float>();
  const float* W = wt.data_ptr<float>();
  float* C = c.data_ptr<float>();
  const int64_t blocks = (M + kProjectRB - 1) / kProjectRB;
  at::parallel_for(0, blocks, grain_for(blocks, kProjectRB * K * r), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = b * kProjectRB;
      if (i + kProjectRB <= M)
        project_rows<kProjectRB>(X + i * K, K, W, C + i * r, r);
      else
        for (int64_t t = i; t < M; ++t) project_rows<1>(X + t * K, K, W, C + t * r, r);
    }
  });
  return c;
}

// b: [r, N], contiguous or any other strides (A.t() for the backward's dh A^T), which cost one copy of r * N numbers.
at::Tensor thin_expand(const at::Tensor& h, const at::Tensor& b_in, const c10::optional<at::Tensor>& bias_in) {
  check_fp32_matrix(h, "thin_expand", "h");
  TORCH_CHECK(b_in.dim() == 2 && b_in.device().is_cpu() && b_in.scalar_type() == at::kFloat,
              "thin_expand: b must be a 2-D float32 CPU tensor");
  const at::Tensor b = b_in.is_contiguous() ? b_in : transposed_copy(b_in.t());
  const int64_t M = h.size(0), r = h.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == r, "thin_expand: h has ", r, " columns, b has ", b.size(0), " rows");
  const float* bias = nullptr;
  if (bias_in.has_value() && bias_in->defined()) {
    const auto& bt = *bias_in;
    TORCH_CHECK(bt.dim() == 1 && bt.size(0) == N && bt.scalar_type() == at::kFloat && bt.is_contiguous() &&
                    bt.device().is_cpu(),
                "thin_expand: bias must be a contiguous float32 CPU tensor of ", N, " elements");
    bias = bt.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, h.options());
  const float* Hp = h.data_ptr<float>();
  const float* Bp = b.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t blocks = (M + kExpandRB - 1) / kExpandRB;
  at::parallel_for(0, blocks, grain_for(blocks, kExpandRB * N * std::max<int64_t>(1, r)), [&](int64_t b0, int64_t b1) {
    expand_rows(Hp, r, Bp, N, bias, Y, b0 * kExpandRB, std::min(M, b1 * kExpandRB));
  });
  return y;
}

at::Tensor thin_reduce(const at::Tensor& h, const at::Tensor& d, bool transposed) {
  check_fp32_matrix(h, "thin_reduce", "h");
  check_fp32_matrix(d, "thin_reduce", "d");
  const int64_t M = h.size(0), r = h.size(1), N = d.size(1);
  TORCH_CHECK(d.size(0) == M, "thin_reduce: h has ", M, " rows, d has ", d.size(0));
  at::Tensor out = transposed ? at::empty({N, r}, h.options()) : at::empty({r, N}, h.options());
  if (M == 0) return out.zero_();
  if (r == 0 || N == 0) return out;
  const float* Hp = h.data_ptr<float>();
  const float* Dp = d.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t strips = N / (2 * VW);
  at::parallel_for(0, strips, grain_for(strips, M * 2 * VW * r), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t j = 0; j < r; j += kReduceJB)
        with_block<kReduceJB>(std::min<int64_t>(kReduceJB, r - j), [&]<int JB>() {
          // a rank group's output starts at row j, or at column j of the transposed output (row stride r)
          reduce_strip<JB>(Hp + j, M, r, Dp, N, s * 2 * VW, O + (transposed ? j : j * N), transposed);
        });
  });
  if (strips * 2 * VW < N) reduce_tail(Hp, M, r, Dp, N, strips * 2 * VW, O, transposed);
  return out;
}

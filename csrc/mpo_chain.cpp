// Native CPU kernel for small-batch MPO inference: y = x @ W.T + bias with W given by MPO cores.
//
// Cores G_k have shape (r_{k-1}, i_k, j_k, r_k) (docs/ARCHITECTURE.md). The chain is swept left to right; step k
// is one small GEMM
//     C[(b, j_<k, i_>k), (j_k, r_k)] = sum_{(r_{k-1}, i_k)} A[(b, j_<k, i_>k), (r_{k-1}, i_k)] * G_k[(r_{k-1}, i_k), (j_k, r_k)]
// where G_k is seen in its own memory layout (a [r*i, j*r] row-major matrix) and A is the previous step's output,
// gathered through precomputed row/column offsets into packed tiles (so no transpose of the state is ever made).
// C rows are contiguous, so the micro-kernel's vector loads and stores run along (j_k, r_k). After the last step C is
// exactly y[b, J] in row-major J order.
//
// Rows of the batch are cut into chunks whose intermediates fit in L2; chunks run in parallel (one thread each,
// the chain of a chunk never leaves that core's cache). With fewer chunks than threads (1 row), the tiles inside each
// step run in parallel instead. Accumulation is always fp32; cores may be fp32 or bf16 (converted to fp32 when packed).
//
// Portable GCC/Clang vector extensions (8 x float) rather than intrinsics: one code path that compiles to AVX2/FMA
// with -march=native and to SSE/NEON elsewhere.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

typedef float v8f __attribute__((vector_size(32)));
// Unaligned, aliasing-safe view for loads and stores.
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));

constexpr int MR = 6;   // rows per micro-tile: 6 rows x 2 vectors = 12 accumulators (+2 panel +1 broadcast = 15 ymm)
constexpr int NR = 16;  // columns per micro-tile (2 vectors of 8)
constexpr int64_t kL2Budget = 512 * 1024;  // bytes of intermediates per chunk (half a typical L2)
// K block of a step: a panel slice (kKc x NR floats, 16 KB) stays in L1 while every row tile of a group passes over
// it. Without it a step with a long K (a merged core, K = r * I in the thousands) streamed the whole core from L3
// once per row tile.
constexpr int64_t kKc = 256;

inline v8f load8(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }

inline float to_f32(float v) { return v; }
inline float to_f32(at::BFloat16 v) { return static_cast<float>(v); }

// C[mr, nc] (+)= Ap x P: Ap is a packed A tile [K, MR] (row values interleaved), P a panel [K, NR] with row stride
// ldp (a packed panel, ldp = NR, or 16 columns of the fp32 core itself, ldp = N). The loop is loads + broadcasts +
// FMAs. Accumulate adds to C (the K blocks after the first); a template parameter so that the plain tile compiles
// exactly as before (with a run-time flag, steps with K <= 256 ran 3-9% slower in CPU time, measured A/B).
template <bool Accumulate>
inline void micro_tile(const float* Ap, int mr, int64_t K, const float* P, int64_t ldp, float* C, int64_t ldc, int nc) {
  v8f acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = v8f{};
  for (int64_t k = 0; k < K; ++k) {
    const v8f b0 = load8(P + k * ldp), b1 = load8(P + k * ldp + 8);
    const float* a = Ap + k * MR;
    for (int r = 0; r < MR; ++r) {
      acc[r][0] += a[r] * b0;
      acc[r][1] += a[r] * b1;
    }
  }
  if (Accumulate) {
    for (int r = 0; r < mr; ++r) {
      const float* a = reinterpret_cast<const float*>(&acc[r][0]);
      for (int c = 0; c < nc; ++c) C[r * ldc + c] += a[c];
    }
  } else if (nc == NR) {
    for (int r = 0; r < mr; ++r) {
      *reinterpret_cast<v8f_u*>(C + r * ldc) = acc[r][0];
      *reinterpret_cast<v8f_u*>(C + r * ldc + 8) = acc[r][1];
    }
  } else {
    for (int r = 0; r < mr; ++r) std::memcpy(C + r * ldc, &acc[r][0], sizeof(float) * nc);
  }
}

// Gather the A rows of row tile `rt` through the step's offsets into a packed [K, MR] tile. Rows past r_used
// repeat the last valid row (valid memory, results never stored).
inline void pack_a_tile(const float* A, const int64_t* roff, const int64_t* koff, int64_t K, int64_t rt,
                        int64_t r_used, float* dst) {
  const float* rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = A + roff[std::min<int64_t>(rt * MR + r, r_used - 1)];
  for (int64_t k = 0; k < K; ++k) {
    const int64_t ko = koff[k];
    for (int r = 0; r < MR; ++r) dst[k * MR + r] = rows[r][ko];
  }
}

// Offsets of every combination of `modes` (size, stride), enumerated row-major.
std::vector<int64_t> offsets(const std::vector<std::pair<int64_t, int64_t>>& modes) {
  std::vector<int64_t> out{0};
  for (const auto& [size, stride] : modes) {
    std::vector<int64_t> next;
    next.reserve(out.size() * size);
    for (int64_t o : out)
      for (int64_t t = 0; t < size; ++t) next.push_back(o + t * stride);
    out.swap(next);
  }
  return out;
}

// One contraction step, laid out for a chunk of `rows` batch rows.
struct Step {
  int64_t R = 0, K = 0, N = 0;   // GEMM sizes for a full chunk
  int64_t rows_per_b = 0;         // R / rows
  std::vector<int64_t> roff;      // R offsets of the GEMM rows into the input buffer
  std::vector<int64_t> koff;      // K offsets, K enumerated as (r_{k-1}, i_k): k is the row of G seen as [r*i, j*r']
  int64_t out_floats = 0;         // R * N
  // The same layout as strided tensor modes, for the ATen GEMM path: A = [row modes..., r_{k-1}, i_k].
  std::vector<int64_t> a_sizes, a_strides;
};

// Build the steps for `rows` batch rows. State modes are tracked as (size, stride) in the current buffer.
std::vector<Step> plan_steps(const std::vector<at::Tensor>& cores, int64_t rows, int64_t in_features) {
  const int64_t n = static_cast<int64_t>(cores.size());
  using Mode = std::pair<int64_t, int64_t>;
  Mode b_mode{rows, in_features};
  std::vector<Mode> j_modes;  // j_1..j_{k-1}
  std::vector<Mode> i_modes;  // i_k..i_N
  {
    int64_t stride = in_features;
    for (int64_t k = 0; k < n; ++k) {
      stride /= cores[k].size(1);
      i_modes.push_back({cores[k].size(1), stride});
    }
  }
  Mode r_mode{1, 0};
  std::vector<Step> steps(n);
  for (int64_t k = 0; k < n; ++k) {
    Step& s = steps[k];
    const int64_t jk = cores[k].size(2), rk = cores[k].size(3);
    std::vector<Mode> row_modes;
    row_modes.push_back(b_mode);
    row_modes.insert(row_modes.end(), j_modes.begin(), j_modes.end());
    row_modes.insert(row_modes.end(), i_modes.begin() + 1, i_modes.end());
    s.roff = offsets(row_modes);
    s.R = static_cast<int64_t>(s.roff.size());
    s.rows_per_b = s.R / rows;
    s.koff = offsets({r_mode, i_modes[0]});
    s.K = static_cast<int64_t>(s.koff.size());
    s.N = jk * rk;
    s.out_floats = s.R * s.N;
    for (const auto& [size, stride] : row_modes) {
      s.a_sizes.push_back(size);
      s.a_strides.push_back(stride);
    }
    s.a_sizes.insert(s.a_sizes.end(), {r_mode.first, i_modes[0].first});
    s.a_strides.insert(s.a_strides.end(), {r_mode.second, i_modes[0].second});
    // Output C[rows][j_k][r_k] is contiguous: recompute strides of the row modes, append j_k, then r_k.
    std::vector<Mode> new_modes(row_modes.size());
    int64_t stride = s.N;
    for (int64_t m = static_cast<int64_t>(row_modes.size()) - 1; m >= 0; --m) {
      new_modes[m] = {row_modes[m].first, stride};
      stride *= row_modes[m].first;
    }
    b_mode = new_modes[0];
    std::vector<Mode> new_j(new_modes.begin() + 1, new_modes.begin() + 1 + j_modes.size());
    new_j.push_back({jk, rk});
    std::vector<Mode> new_i(new_modes.begin() + 1 + j_modes.size(), new_modes.end());
    j_modes.swap(new_j);
    i_modes.swap(new_i);
    r_mode = {rk, 1};
  }
  return steps;
}

// Copy columns [n0, n0 + nc) of G (a [K, N] matrix) into an fp32 panel [K, NR], zero-padding past nc. Packing
// makes panel reads sequential, converts bf16 once per panel, and handles the column remainder.
template <typename WT>
void pack_panel(const Step& s, const WT* M, int64_t n0, int nc, float* P) {
  for (int64_t k = 0; k < s.K; ++k) {
    const WT* src = M + k * s.N + n0;
    float* dst = P + k * NR;
    int c = 0;
    for (; c < nc; ++c) dst[c] = to_f32(src[c]);
    for (; c < NR; ++c) dst[c] = 0.f;
  }
}

// C[r_used, N] = A (via offsets) @ G; `parallel` splits (column block, row-tile group) tasks over threads.
template <typename WT>
void run_step(const Step& s, int64_t r_used, const float* A, const WT* M, float* C, bool parallel) {
  const int64_t K = s.K, N = s.N;
  const int64_t n_blocks = (N + NR - 1) / NR;
  const int64_t r_tiles = (r_used + MR - 1) / MR;
  const int64_t threads = parallel && r_used * K * N >= kMinParallelFma ? at::get_num_threads() : 1;
  // Row tiles are grouped so that one group's packed A (per_group * K * MR floats) stays in L2 (~128 KB) while all
  // column panels stream past it; with few column blocks (the last core has N = j_N) the groups are also made
  // small enough that every thread gets work.
  int64_t per_group = std::max<int64_t>(1, 32768 / (std::min(K, kKc) * MR));
  if (threads > 1) {
    const int64_t want_groups = (4 * threads + n_blocks - 1) / n_blocks;
    per_group = std::min(per_group, std::max<int64_t>(1, r_tiles / want_groups));
  }
  per_group = std::min(per_group, r_tiles);
  const int64_t groups = (r_tiles + per_group - 1) / per_group;
  // Pack A once per step (one pass over R*K values; the GEMM does 2*N flops per value): afterwards every
  // micro-tile reads its A rows sequentially instead of gathering them through offsets for every column block.
  // Pack G once per step into [n_blocks][K][NR] fp32 panels (converting bf16 here, once).
  // With few row tiles a packed panel would be read only a few times, so packing all of G (one pass over the core)
  // would cost as much as the GEMM: fp32 full column blocks are then read in place (ldp = N) and only the
  // remainder block is packed.
  const bool direct = std::is_same<WT, float>::value && r_tiles <= 16;
  const int64_t n_full = N / NR;
  const int64_t first_packed = direct ? n_full : 0;  // column blocks [first_packed, n_blocks) are packed
  static thread_local std::vector<float> a_packed, b_packed;
  if (a_packed.size() < static_cast<size_t>(r_tiles * K * MR)) a_packed.resize(r_tiles * K * MR);
  if (b_packed.size() < static_cast<size_t>((n_blocks - first_packed) * K * NR))
    b_packed.resize((n_blocks - first_packed) * K * NR);
  float* Ap = a_packed.data();
  float* Bp = b_packed.data();
  const int64_t n_pack_tasks = r_tiles + (n_blocks - first_packed);
  auto pack = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t < r_tiles) {
        pack_a_tile(A, s.roff.data(), s.koff.data(), K, t, r_used, Ap + t * K * MR);
      } else {
        const int64_t nb = first_packed + (t - r_tiles);
        pack_panel<WT>(s, M, nb * NR, static_cast<int>(std::min<int64_t>(NR, N - nb * NR)),
                       Bp + (nb - first_packed) * K * NR);
      }
    }
  };
  auto panel = [&](int64_t nb, int64_t* ldp) -> const float* {
    if (nb < first_packed) {  // only reached when WT is float
      *ldp = N;
      return reinterpret_cast<const float*>(M) + nb * NR;
    }
    *ldp = NR;
    return Bp + (nb - first_packed) * K * NR;
  };
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      // Group outer, column block inner: a thread's consecutive tasks reuse the same L2-resident A group.
      const int64_t g = t / n_blocks, nb = t % n_blocks;
      const int nc = static_cast<int>(std::min<int64_t>(NR, N - nb * NR));
      const int64_t rt_end = std::min(r_tiles, (g + 1) * per_group);
      int64_t ldp = 0;
      const float* P = panel(nb, &ldp);
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kk = std::min(kKc, K - k0);
        for (int64_t rt = g * per_group; rt < rt_end; ++rt) {
          const int64_t r0 = rt * MR;
          const int mr = static_cast<int>(std::min<int64_t>(MR, r_used - r0));
          const float* a = Ap + rt * K * MR + k0 * MR;
          float* c = C + r0 * N + nb * NR;
          if (k0 == 0)
            micro_tile<false>(a, mr, kk, P, ldp, c, N, nc);
          else
            micro_tile<true>(a, mr, kk, P + k0 * ldp, ldp, c, N, nc);
        }
      }
    }
  };
  const int64_t n_tasks = n_blocks * groups;
  if (threads > 1) {
    // Grains keep about 32k copies / 100k FMAs per thread chunk so thread wake-up never dominates a tiny step.
    at::parallel_for(0, n_pack_tasks, std::max<int64_t>(1, 32768 / (K * NR)), pack);
    const int64_t task_fma = std::max<int64_t>(1, per_group * MR * NR * K);
    at::parallel_for(0, n_tasks, std::max<int64_t>(1, 100000 / task_fma), body);
  } else {
    pack(0, n_pack_tasks);
    body(0, n_tasks);
  }
}

// gemm=2 routes every step through ATen's GEMM (MKL/oneDNN) after a gather copy of A; gemm=0 and 1 use the fused
// micro-kernel. Neither wins everywhere on the measured CPU (docs/native.md), so the Python wrapper times both on the
// first call of each shape and passes the winner here.
enum class GemmMode : int64_t { kAuto = 0, kKernel = 1, kAten = 2 };

bool use_aten(GemmMode mode) { return mode == GemmMode::kAten; }

// One step through ATen: gather A (a strided view of the buffer) into [R, K] with K = (r_{k-1}, i_k), the core's own
// row order, then C = A @ G[r*i, j*r'] with at::mm_out straight into the output buffer.
void aten_step(const Step& s, int64_t r_used, const float* A, const at::Tensor& core, float* C) {
  std::vector<int64_t> sizes = s.a_sizes, strides = s.a_strides;
  sizes[0] = r_used / s.rows_per_b;  // batch rows of this chunk (the first row mode is the batch)
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = at::from_blob(const_cast<float*>(A), sizes, strides, f32).reshape({r_used, s.K});
  at::Tensor g = core.reshape({s.K, s.N});
  if (g.scalar_type() != at::kFloat) g = g.to(at::kFloat);
  at::Tensor c = at::from_blob(C, {r_used, s.N}, f32);
  at::mm_out(c, a, g);
}

template <typename WT>
void chain_chunk(const std::vector<Step>& steps, const std::vector<at::Tensor>& cores, int64_t rows, const float* x,
                 float* y, bool parallel, GemmMode mode) {
  // Two ping-pong buffers for the intermediates of this chunk; reused across calls on the same thread.
  static thread_local std::vector<float> buf[2];
  const float* in = x;
  const size_t n = steps.size();
  for (size_t k = 0; k < n; ++k) {
    const Step& s = steps[k];
    const int64_t r_used = rows * s.rows_per_b;
    float* out;
    if (k + 1 == n) {
      out = y;
    } else {
      std::vector<float>& b = buf[k % 2];
      if (b.size() < static_cast<size_t>(r_used * s.N)) b.resize(r_used * s.N);
      out = b.data();
    }
    if (use_aten(mode))
      aten_step(s, r_used, in, cores[k], out);
    else
      run_step<WT>(s, r_used, in, cores[k].data_ptr<WT>(), out, parallel);
    in = out;
  }
}

// The steps of a chain depend only on the core shapes and the chunk's row count, so they are built once and kept
// (per thread, so no lock): rebuilding them (offset tables, a dozen small vectors) cost ~10% of a 1-row call on a
// small layer. The key is (rows, in_features, r0, i, j, r1 of every core).
const std::vector<Step>& cached_steps(const std::vector<at::Tensor>& cores, int64_t rows, int64_t in_features) {
  static thread_local std::map<std::vector<int64_t>, std::unique_ptr<std::vector<Step>>> cache;
  std::vector<int64_t> key{rows, in_features};
  for (const auto& c : cores)
    for (int d = 0; d < 4; ++d) key.push_back(c.size(d));
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  if (cache.size() >= 256) cache.clear();  // bound the memory of processes that see many shapes
  auto steps = std::make_unique<std::vector<Step>>(plan_steps(cores, rows, in_features));
  return *cache.emplace(std::move(key), std::move(steps)).first->second;
}

template <typename WT>
void chain_forward(const std::vector<at::Tensor>& cores, const float* x, float* y, int64_t B, int64_t in_features,
                   int64_t out_features, GemmMode mode) {
  // Largest intermediate per batch row decides how many rows share one cache-resident chunk. Step k leaves
  // prod(j_<=k) * r_k * prod(i_>k) floats per row.
  int64_t per_row = 0;
  {
    int64_t j_done = 1, i_left = in_features;
    for (const auto& c : cores) {
      j_done *= c.size(2);
      i_left /= c.size(1);
      per_row = std::max(per_row, j_done * c.size(3) * i_left);
    }
  }
  const bool any_aten = use_aten(mode);
  const int64_t threads = at::get_num_threads();
  int64_t chunk = std::max<int64_t>(1, kL2Budget / (2 * 4 * std::max<int64_t>(per_row, 1)));
  // Row chunks in parallel only when there is enough work per thread (see kMinParallelFma).
  int64_t fma_per_row = 0;
  {
    int64_t j_before = 1, i_after = in_features;
    for (const auto& c : cores) {
      i_after /= c.size(1);
      fma_per_row += c.numel() * j_before * i_after;
      j_before *= c.size(2);
    }
  }
  if (B >= 2 && threads > 1 && B * fma_per_row >= 2 * kMinParallelFma) chunk = std::min(chunk, (B + threads - 1) / threads);
  // ATen's GEMM threads itself and wants the whole batch in one call: no row chunks then.
  if (any_aten) chunk = B;
  chunk = std::min(chunk, B);
  const int64_t n_chunks = (B + chunk - 1) / chunk;
  const std::vector<Step>& steps = cached_steps(cores, chunk, in_features);
  if (n_chunks == 1) {
    chain_chunk<WT>(steps, cores, B, x, y, /*parallel=*/true, mode);
    return;
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b0 = c * chunk;
      const int64_t rows = std::min(chunk, B - b0);
      chain_chunk<WT>(steps, cores, rows, x + b0 * in_features, y + b0 * out_features, /*parallel=*/false, mode);
    }
  });
}

}  // namespace

// x: [..., in_features] fp32 or bf16 (any strides); cores: fp32 or bf16, all the same dtype; bias: [out_features]
// (any float dtype) or None. Returns [..., out_features] in x's dtype. Forward only. Every argument is checked here,
// so the Python wrapper can skip its own checks on the hot path and only re-validate (for a clearer error) on failure.
at::Tensor mpo_chain_forward(const at::Tensor& x, const std::vector<at::Tensor>& cores_in,
                             const c10::optional<at::Tensor>& bias_in, int64_t gemm) {
  TORCH_CHECK(gemm >= 0 && gemm <= 2, "mpo_chain_forward: gemm must be 0 (auto), 1 (kernel) or 2 (aten)");
  const auto mode = static_cast<GemmMode>(gemm);
  TORCH_CHECK(!cores_in.empty(), "mpo_chain_forward: needs at least one core");
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu(), "mpo_chain_forward: x must be a CPU tensor with >= 1 dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "mpo_chain_forward: x must be float32 or bfloat16");
  const at::Tensor* bias = bias_in.has_value() && bias_in->defined() ? &*bias_in : nullptr;
  const bool wants_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || (bias && bias->requires_grad()) ||
                           std::any_of(cores_in.begin(), cores_in.end(), [](const at::Tensor& c) { return c.requires_grad(); }));
  TORCH_CHECK(!wants_grad, "mpo_chain_forward is forward-only: use backend='torch' for training");
  const auto wdt = cores_in[0].scalar_type();
  TORCH_CHECK(wdt == at::kFloat || wdt == at::kBFloat16, "mpo_chain_forward: cores must be float32 or bfloat16");
  std::vector<at::Tensor> cores;
  int64_t in_features = 1, out_features = 1;
  for (size_t k = 0; k < cores_in.size(); ++k) {
    const auto& c = cores_in[k];
    TORCH_CHECK(c.dim() == 4 && c.device().is_cpu() && c.scalar_type() == wdt,
                "mpo_chain_forward: core ", k, " must be a 4-D CPU tensor of the first core's dtype");
    TORCH_CHECK(k == 0 ? c.size(0) == 1 : c.size(0) == cores_in[k - 1].size(3), "mpo_chain_forward: bond mismatch at core ", k);
    cores.push_back(c.contiguous());
    in_features *= c.size(1);
    out_features *= c.size(2);
  }
  TORCH_CHECK(cores.back().size(3) == 1, "mpo_chain_forward: last bond must be 1");
  TORCH_CHECK(x.size(-1) == in_features, "mpo_chain_forward: x has ", x.size(-1), " features, cores expect ", in_features);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->device().is_cpu() &&
                    at::isFloatingType(bias->scalar_type()),
                "mpo_chain_forward: bias must be a floating [out_features] CPU tensor");
  }
  const int64_t B = x.numel() / in_features;
  // Skip the ATen calls that would return x itself (each costs ~1 us of dispatch on a ~20 us call).
  at::Tensor xf = x.scalar_type() == at::kFloat && x.is_contiguous() ? x : x.reshape({B, in_features}).to(at::kFloat).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor y = at::empty(out_shape, x.options().dtype(at::kFloat));
  if (B > 0) {
    if (wdt == at::kFloat)
      chain_forward<float>(cores, xf.data_ptr<float>(), y.data_ptr<float>(), B, in_features, out_features, mode);
    else
      chain_forward<at::BFloat16>(cores, xf.data_ptr<float>(), y.data_ptr<float>(), B, in_features, out_features,
                                  mode);
  }
  if (bias && B > 0) {
    // a plain loop (vectorised by the compiler) instead of an ATen add: one pass over y, no dispatch
    at::Tensor bf = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
    const float* bp = bf.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      float* row = yp + b * out_features;
      for (int64_t o = 0; o < out_features; ++o) row[o] += bp[o];
    }
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

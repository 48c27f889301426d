// Entry points of the tnkernels._native extension (bound to Python in module.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// Work with fewer multiply-adds than this runs on the calling thread, in every kernel of the extension: measured on
// a 2-core VM shared with other jobs, a parallel region whose partner thread is descheduled costs milliseconds, and
// even on an idle core a fork/join costs a few microseconds, which a ~50 us step cannot earn back.
inline constexpr int64_t kMinParallelFma = 1 << 20;

// mpo_chain.cpp: fused MPO chain forward for small-batch inference.
at::Tensor mpo_chain_forward(const at::Tensor& x, const std::vector<at::Tensor>& cores,
                             const c10::optional<at::Tensor>& bias, int64_t gemm);

// thin_gemm.cpp: the two GEMMs of a low-rank layer at small ranks (fp32).
at::Tensor thin_project(const at::Tensor& x, const at::Tensor& a);
at::Tensor thin_expand(const at::Tensor& h, const at::Tensor& b, const c10::optional<at::Tensor>& bias);
at::Tensor thin_reduce(const at::Tensor& h, const at::Tensor& d, bool transposed);

// low_rank.cpp: the autograd Function of a low-rank layer (forward and backward in C++), choices passed as flags.
at::Tensor low_rank_linear(const at::Tensor& x2d, const at::Tensor& g1, const at::Tensor& g2,
                           const c10::optional<at::Tensor>& bias, bool save_h, int64_t flags);
// The same forward without autograd (inference), on the factors A [in, r] and B [r, out] themselves.
at::Tensor low_rank_forward(const at::Tensor& x2d, const at::Tensor& a, const at::Tensor& b,
                            const c10::optional<at::Tensor>& bias, int64_t flags);

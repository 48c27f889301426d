// The autograd Function of a low-rank layer, y = (x A) B + bias, in C++: the same forward and backward as
// tnkernels/ops/mpo/torch_low_rank.py's LowRankFunction, without Python in the backward.
//
// Why: at small row counts a training step of a low-rank layer is mostly per-op overhead. The Python Function's
// backward issues a dozen tensor operations from Python (~2 us each at one row, plus the Python node's own cost);
// here they are ATen calls from C++. Measured before writing it (one thread, a prototype with the same GEMMs):
// 512 -> 1000 at rank 5, one row, 74 -> 41 us a step; rank 84, 109 -> 73 us; 64 rows 1.1-1.24x.
//
// What to run is decided in Python, once per input shape, by the same predicates the Python Function uses
// (torch_low_rank.plan_flags), and passed here as bit flags: the choices live in one place, and this file only
// executes them. Every flag is a permission, never a requirement: a native kernel is used only if its operands
// also qualify here (fp32, CPU, contiguous), else ATen runs the product.

#include "kernels.h"

#include <torch/csrc/autograd/custom_function.h>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Bits of `flags`; the same values as torch_low_rank.py's constants.
constexpr int64_t kProjectNative = 1;   // x A on thin_project
constexpr int64_t kExpandNative = 2;    // h B + bias on thin_expand
constexpr int64_t kFoldBias = 4;        // bias as one more row of B ([h, 1] in the backward gives dB and dbias)
constexpr int64_t kAddInPlace = 8;      // h B, then add_(bias), instead of addmm
constexpr int64_t kDhNative = 16;       // the backward's dy B^T on thin_project
constexpr int64_t kGradATransposed = 32;  // dA as (dh^T x)^T
constexpr int64_t kDxNative = 64;         // the backward's dh A^T on thin_expand
constexpr int64_t kDbNative = 128;        // the backward's h^T dy (with [h, 1]: and dbias) on thin_reduce
constexpr int64_t kDaNative = 256;        // the backward's x^T dh on thin_reduce (before kGradATransposed)

bool thin_ok(const Tensor& t) { return t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(); }

Tensor with_ones(const Tensor& h) {
  const int64_t rank = h.size(1);
  Tensor h1 = at::empty({h.size(0), rank + 1}, h.options());
  h1.narrow(1, 0, rank).copy_(h);
  h1.select(1, rank).fill_(1);
  return h1;
}

Tensor first_gemm(const Tensor& x2d, const Tensor& a, int64_t flags) {
  if ((flags & kProjectNative) && thin_ok(x2d) && a.scalar_type() == at::kFloat) return thin_project(x2d, a);
  return at::mm(x2d, a);
}

// y = (x A) B + bias, and the left operand of the second GEMM: h, or [h, 1] where the bias rode in that GEMM.
std::pair<Tensor, Tensor> forward_products(const Tensor& x2d, const Tensor& a, const Tensor& b, const Tensor& bias,
                                           bool has_bias, int64_t flags) {
  Tensor h = first_gemm(x2d, a, flags);
  if (!has_bias) return {at::mm(h, b), h};
  if ((flags & kExpandNative) && thin_ok(h) && thin_ok(b) && thin_ok(bias)) return {thin_expand(h, b, bias), h};
  if (flags & kFoldBias) {
    h = with_ones(h);
    return {at::mm(h, at::cat({b, bias.unsqueeze(0)}, 0)), h};
  }
  if (flags & kAddInPlace) return {at::mm(h, b).add_(bias), h};
  return {at::addmm(bias, h, b), h};
}

struct LowRankFn : public torch::autograd::Function<LowRankFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x2d, const Tensor& g1, const Tensor& g2,
                        const Tensor& bias, bool has_bias, bool save_h, int64_t flags) {
    const Tensor a = g1.view({g1.size(1), g1.size(3)});
    const Tensor b = g2.view({g2.size(0), g2.size(2)});
    const bool ones_in_backward = has_bias && (flags & kFoldBias);
    auto [y, h] = forward_products(x2d, a, b, bias, has_bias, flags);
    ctx->saved_data["flags"] = flags;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["ones"] = ones_in_backward;
    ctx->save_for_backward({x2d, g1, g2, save_h ? h : Tensor()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x2d = saved[0], &g1 = saved[1], &g2 = saved[2];
    Tensor h = saved[3];
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool ones = ctx->saved_data["ones"].toBool();
    // dy often arrives expanded (stride 0, from a sum or mean), a slow case for the BLAS: materialize it once
    const Tensor dy = grads[0].contiguous();
    const Tensor a = g1.view({g1.size(1), g1.size(3)});
    const Tensor b = g2.view({g2.size(0), g2.size(2)});
    const int64_t rank = b.size(0);
    const bool need_x = ctx->needs_input_grad(0), need_g1 = ctx->needs_input_grad(1);
    const bool need_g2 = ctx->needs_input_grad(2), need_bias = has_bias && ctx->needs_input_grad(3);
    if (at::GradMode::is_enabled()) {
      // create_graph=True (gradient penalties, MAML): the saved h and the thin kernels are constants to autograd,
      // so a gradient of their results would silently lose terms. The same formulas in plain differentiable ops
      // on the saved inputs instead: exact to any order.
      const Tensor dh_g = at::mm(dy, b.t());
      return {need_x ? at::mm(dh_g, a.t()) : Tensor(),
              need_g1 ? at::mm(x2d.t(), dh_g).view(g1.sizes()) : Tensor(),
              need_g2 ? at::mm(at::mm(x2d, a).t(), dy).view(g2.sizes()) : Tensor(),
              need_bias ? dy.sum(0) : Tensor(),
              Tensor(), Tensor(), Tensor()};
    }

    Tensor dh, d_g1, d_g2, d_bias, dx;
    if (need_x || need_g1) {
      const Tensor bt = b.t();
      const bool native = (flags & kDhNative) && thin_ok(dy) && b.scalar_type() == at::kFloat;
      dh = native ? thin_project(dy, bt) : at::mm(dy, bt);
    }
    if (need_g1) {
      Tensor d_a;
      if ((flags & kDaNative) && thin_ok(x2d) && thin_ok(dh))
        d_a = thin_reduce(dh, x2d, /*transposed=*/true);
      else
        // in the parameter's layout: autograd would copy the transposed view anyway, and DDP warns about it
        d_a = (flags & kGradATransposed) ? at::mm(dh.t(), x2d).t().contiguous() : at::mm(x2d.t(), dh);
      d_g1 = d_a.view(g1.sizes());
    }
    if (need_g2) {
      if (!h.defined()) h = first_gemm(x2d, a, flags);  // the recompute option
      if (ones && h.size(1) == rank) h = with_ones(h);
      // [rank (+ 1), out]: with the ones column, its last row is the bias gradient
      const Tensor d_b =
          ((flags & kDbNative) && thin_ok(h) && thin_ok(dy)) ? thin_reduce(h, dy, false) : at::mm(h.t(), dy);
      d_g2 = (d_b.size(0) > rank ? d_b.narrow(0, 0, rank) : d_b).view(g2.sizes());
      if (ones && need_bias) d_bias = d_b.select(0, rank);
    }
    if (need_x) {
      const bool native = (flags & kDxNative) && thin_ok(dh) && a.scalar_type() == at::kFloat;
      dx = native ? thin_expand(dh, a.t(), c10::nullopt) : at::mm(dh, a.t());
    }
    if (need_bias && !d_bias.defined()) d_bias = dy.sum(0);
    return {dx, d_g1, d_g2, d_bias, Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

at::Tensor low_rank_linear(const at::Tensor& x2d, const at::Tensor& g1, const at::Tensor& g2,
                           const c10::optional<at::Tensor>& bias, bool save_h, int64_t flags) {
  TORCH_CHECK(x2d.dim() == 2 && g1.dim() == 4 && g2.dim() == 4 && g1.size(2) == 1 && g2.size(1) == 1 &&
                  g1.size(3) == g2.size(0) && x2d.size(1) == g1.size(1) && g1.is_contiguous() && g2.is_contiguous(),
              "low_rank_linear: expects x [rows, in], contiguous cores (1, in, 1, r) and (r, 1, out, 1)");
  // autograd's bookkeeping reads the device of every tensor argument, so a missing bias travels as an empty one
  const bool has_bias = bias.has_value() && bias->defined();
  return LowRankFn::apply(x2d, g1, g2, has_bias ? *bias : at::empty({0}, x2d.options()), has_bias, save_h, flags);
}

at::Tensor low_rank_forward(const at::Tensor& x2d, const at::Tensor& a, const at::Tensor& b,
                            const c10::optional<at::Tensor>& bias, int64_t flags) {
  TORCH_CHECK(x2d.dim() == 2 && a.dim() == 2 && b.dim() == 2 && x2d.size(1) == a.size(0) && a.size(1) == b.size(0),
              "low_rank_forward: expects x [rows, in], A [in, r] and B [r, out]");
  const bool has_bias = bias.has_value() && bias->defined();
  return forward_products(x2d, a, b, has_bias ? *bias : at::Tensor(), has_bias, flags).first;
}

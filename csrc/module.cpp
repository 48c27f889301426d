// Python bindings of the tnkernels._native extension; the kernels live in mpo_chain.cpp, thin_gemm.cpp and
// low_rank.cpp.
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tnkernels native CPU kernels (csrc/): fused MPO chain for small-batch inference, thin low-rank GEMMs";
  m.def("mpo_chain_forward", &mpo_chain_forward, "MPO chain forward: y = x @ W.T + bias (fp32 accumulate)",
        pybind11::arg("x"), pybind11::arg("cores"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("gemm") = 0);
  m.def("thin_project", &thin_project, "C[M, r] = x[M, K] @ a[K, r] for a small r (fp32; x contiguous)",
        pybind11::arg("x"), pybind11::arg("a"));
  m.def("thin_expand", &thin_expand, "Y[M, N] = h[M, r] @ b[r, N] + bias for a small r (fp32, contiguous)",
        pybind11::arg("h"), pybind11::arg("b"), pybind11::arg("bias") = pybind11::none());
  m.def("thin_reduce", &thin_reduce,
        "Out[r, N] = h[M, r]^T @ d[M, N] for a small r (fp32, contiguous); transposed: Out^T, [N, r], contiguous",
        pybind11::arg("h"), pybind11::arg("d"), pybind11::arg("transposed") = false);
  m.def("low_rank_linear", &low_rank_linear,
        "y = (x A) B + bias for low-rank cores (1, in, 1, r), (r, 1, out, 1), with its backward in C++; flags: "
        "tnkernels.ops.mpo.torch_low_rank.plan_flags",
        pybind11::arg("x2d"), pybind11::arg("g1"), pybind11::arg("g2"), pybind11::arg("bias"), pybind11::arg("save_h"),
        pybind11::arg("flags"));
  m.def("low_rank_forward", &low_rank_forward,
        "y = (x A) B + bias without autograd (inference); the same flags as low_rank_linear", pybind11::arg("x2d"),
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("bias"), pybind11::arg("flags"));
}

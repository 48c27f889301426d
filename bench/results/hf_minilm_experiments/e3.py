from h import *
import random
def whiten_lowrank(lin, xin, ratio, eps=1e-4):
    W = lin.weight.detach().double(); out_f, in_f = W.shape
    r = int(out_f * in_f / ratio // (out_f + in_f))
    X = xin.double(); C = X.T @ X / len(X)
    C += eps * C.diagonal().mean() * torch.eye(in_f, dtype=C.dtype)
    L = torch.linalg.cholesky(C)
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    A = U[:, :r] * S[:r].sqrt(); B = (S[:r].sqrt()[:, None] * Vh[:r]) @ torch.linalg.inv(L)
    m = MPOLinear.from_linear(lin, in_modes=(in_f, 1), out_modes=(1, out_f), ratio=ratio)
    with torch.no_grad():
        m.cores[0].copy_(B.T.reshape(1, in_f, 1, r).float()); m.cores[1].copy_(A.T.reshape(r, 1, out_f, 1).float())
    return m
def lowrank(ffn, x, ratio, white=True):
    xi = x
    h = ffn.inter(x).detach()
    if white:
        ffn.inter.dense = whiten_lowrank(ffn.inter.dense, xi, ratio)
        ffn.out.dense = whiten_lowrank(ffn.out.dense, h, ratio)
    else:
        ffn.inter.dense = MPOLinear.from_linear(ffn.inter.dense, in_modes=(384,1), out_modes=(1,1536), ratio=ratio)
        ffn.out.dense = MPOLinear.from_linear(ffn.out.dense, in_modes=(1536,1), out_modes=(1,384), ratio=ratio)
    return ffn
if __name__ == "__main__":
  for i in [0, 5]:
      x, y = capture(teacher, cal, i); xv, yv = capture(teacher, held, i)
      for r in [2.0, 4.0]:
          with torch.no_grad():
              f0 = mpoize(FFN(teacher.encoder.layer[i]), r)
              f1 = lowrank(FFN(teacher.encoder.layer[i]), x, r, white=False)
              f2 = lowrank(FFN(teacher.encoder.layer[i]), x, r, white=True)
              print(i, r, "mpo", round(nmse(f0(xv), yv),4), "svd", round(nmse(f1(xv), yv),4), "wsvd train", round(nmse(f2(x), y),4), "held", round(nmse(f2(xv), yv),4), f2.inter.dense.compression_ratio, flush=True)

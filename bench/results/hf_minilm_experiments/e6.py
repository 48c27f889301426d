"""Rank split between the FFN's two layers at a fixed total (2x): whitened low rank, no training."""
from h import *
import sys
def wlr(lin, xin, r, eps=1e-4):
    W = lin.weight.detach().double(); out_f, in_f = W.shape
    X = xin.double(); C = X.T @ X / len(X); C += eps * C.diagonal().mean() * torch.eye(in_f, dtype=C.dtype)
    L = torch.linalg.cholesky(C); U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    A = (U[:, :r] * S[:r]).float(); B = torch.linalg.solve_triangular(L, Vh[:r], upper=False, left=False).float()
    return lambda x: x @ B.T @ A.T + lin.bias
i = int(sys.argv[1])
x, y = capture(teacher, cal, i); xv, yv = capture(teacher, held, i)
L = teacher.encoder.layer[i]
with torch.no_grad():
    h = L.intermediate(x)
    for r1 in [100, 130, 153, 176, 206]:
        r2 = 306 - r1
        f1 = wlr(L.intermediate.dense, x, r1); f2 = wlr(L.output.dense, h, r2)
        act = L.intermediate.intermediate_act_fn
        run = lambda z: L.output.LayerNorm(L.output.dropout(f2(act(f1(z)))) + z)
        print(i, r1, r2, "held", round(nmse(run(xv), yv), 4), flush=True)

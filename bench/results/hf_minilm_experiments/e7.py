"""Intra-slice correction: fit output.dense to the *compressed* intermediate's activations (cross-covariance
least squares, then whitened truncation), vs fitting it to the teacher's activations. 2x, no training."""
from h import *
import sys
def fit(W, b, Hs, Ht, r, eps=1e-4):
    """rank-r W' minimising ||W Ht - W' Hs|| (rows = tokens)."""
    W = W.double(); Hs = Hs.double(); Ht = Ht.double(); n = Hs.shape[1]
    C = Hs.T @ Hs / len(Hs); C += eps * C.diagonal().mean() * torch.eye(n, dtype=C.dtype)
    Wstar = torch.linalg.solve(C, (Hs.T @ Ht / len(Hs)) @ W.T).T  # unconstrained LS solution [out, in]
    L = torch.linalg.cholesky(C); U, S, Vh = torch.linalg.svd(Wstar @ L, full_matrices=False)
    A = (U[:, :r] * S[:r]).float(); B = torch.linalg.solve_triangular(L, Vh[:r], upper=False, left=False).float()
    return lambda x: x @ B.T @ A.T + b
for i in [int(a) for a in sys.argv[1:]]:
    x, y = capture(teacher, cal, i); xv, yv = capture(teacher, held, i)
    L = teacher.encoder.layer[i]; act = L.intermediate.intermediate_act_fn
    with torch.no_grad():
        f1 = fit(L.intermediate.dense.weight, L.intermediate.dense.bias, x, x, 153)
        ht = L.intermediate(x); hs = act(f1(x))
        for name, H in [("teacher-h", ht), ("student-h", hs)]:
            f2 = fit(L.output.dense.weight, L.output.dense.bias, H, ht, 153)
            run = lambda z: L.output.LayerNorm(f2(act(f1(z))) + z)
            print(i, name, "train", round(nmse(run(x), y), 4), "held", round(nmse(run(xv), yv), 4), flush=True)

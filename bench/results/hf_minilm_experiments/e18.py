"""e18: rank allocation across the 12 FFN linears at the same total size (2x), one-shot whitened low rank.

python e18.py  -- end-to-end mean cosine on the held-out sentences, no training, teacher inputs (parallel):
uniform rank 153 everywhere against a global allocation of the same total rank. Every FFN linear costs
in + out = 1920 weights per unit of rank, so equal total rank is equal size. The allocation keeps the largest
whitened singular values across layers, each normalised by its layer's total (relative output error).
"""
from h import *
torch.set_num_threads(2)

def whitened(module, x, rank, damp=1e-4):
    w = module.weight.detach().double()
    c = (x.double().T @ x.double()) / len(x)
    c = c + damp * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    chol = torch.linalg.cholesky(c)
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    return u, s, vh, chol

def lowrank_linear(module, svd, r):
    u, s, vh, chol = svd
    root = s[:r].sqrt()
    left = u[:, :r] * root
    right = torch.linalg.solve_triangular(chol, root[:, None] * vh[:r], upper=False, left=False)
    out_f, in_f = module.weight.shape
    layer = MPOLinear(in_f, out_f, in_modes=(in_f, 1), out_modes=(1, out_f), bonds=(r,))
    with torch.no_grad():
        layer.cores[0].copy_(right.T.reshape(1, in_f, 1, r).float())
        layer.cores[1].copy_(left.T.reshape(r, 1, out_f, 1).float())
        layer.bias.copy_(module.bias)
    return layer

svds, mods = {}, {}
with torch.no_grad():
    for i in range(6):
        x, _ = capture(teacher, cal, i)
        L = teacher.encoder.layer[i]
        hid = L.intermediate(x)
        svds[(i, "inter")] = whitened(L.intermediate.dense, x, 0); mods[(i, "inter")] = L.intermediate.dense
        svds[(i, "out")] = whitened(L.output.dense, hid, 0); mods[(i, "out")] = L.output.dense
budget = 153 * len(svds)
scores = []
for key, (u, s, vh, chol) in svds.items():
    rel = s**2 / (s**2).sum()
    scores += [(float(v), key) for v in rel]
scores.sort(reverse=True)
alloc = {k: 0 for k in svds}
for _, key in scores[:budget]:
    alloc[key] += 1
print("global allocation:", {f"{i}.{n}": r for (i, n), r in alloc.items()}, flush=True)

def build(ranks):
    student = copy.deepcopy(teacher)
    for (i, n), r in ranks.items():
        layer = student.encoder.layer[i]
        target = layer.intermediate if n == "inter" else layer.output
        target.dense = lowrank_linear(mods[(i, n)], svds[(i, n)], max(1, r))
    return student

with torch.no_grad():
    for label, ranks in (("uniform 153", {k: 153 for k in svds}), ("global", alloc)):
        print(label, cosine(build(ranks)), flush=True)

"""e11: damping of the whitened init (distill.hf.whiten.whitened_lowrank's damp, default 1e-4), one FFN at 2x.

python e11.py BLOCK   -- held-out and training-token NMSE of the whitened low-rank FFN for several damps.
A larger damp pulls the whitening towards the plain SVD in directions the 3165 calibration tokens barely
visit: less fit on the training tokens, maybe better on unseen ones (train 0.04-0.05 vs held-out 0.05-0.07).
"""
from h import *
from distill.hf.whiten import whitened_lowrank
torch.set_num_threads(1)

def fit(i, x, damp, ratio=2.0):
    f = FFN(teacher.encoder.layer[i])
    with torch.no_grad():
        hid = f.inter(x)
        f.inter.dense = whitened_lowrank(f.inter.dense, (x.double().T @ x.double()), len(x), ratio=ratio, damp=damp)
        f.out.dense = whitened_lowrank(f.out.dense, (hid.double().T @ hid.double()), len(x), ratio=ratio, damp=damp)
    return f

if __name__ == "__main__":
    i = int(sys.argv[1])
    x, y = capture(teacher, cal, i); xv, yv = capture(teacher, held, i)
    for damp in [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]:
        with torch.no_grad():
            f = fit(i, x, damp)
            print(f"block {i} damp {damp:g} train {nmse(f(x), y):.4f} held {nmse(f(xv), yv):.4f}", flush=True)

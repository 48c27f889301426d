"""e14: how much compression would a 0.01 slice error allow? Whitened low-rank FFN one-shot NMSE vs ratio.

python e14.py BLOCK  -- training-token and held-out NMSE of the whitened init at ratios 1.25 ... 4.
"""
from h import *
from e11 import fit

i = int(sys.argv[1])
x, y = capture(teacher, cal, i); xv, yv = capture(teacher, held, i)
for r in [1.1, 1.25, 1.5, 2.0, 3.0, 4.0]:
    with torch.no_grad():
        f = fit(i, x, 1e-4, ratio=r)
        print(f"block {i} ratio {r:g} bond {f.inter.dense.bonds[0]} train {nmse(f(x), y):.4f} held {nmse(f(xv), yv):.4f}", flush=True)

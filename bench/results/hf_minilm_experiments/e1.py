from h import *
# structure + one-shot held-out NMSE, per layer
for i in [0, 3, 5]:
    x, y = capture(teacher, cal, i); xv, yv = capture(teacher, held, i)
    print("layer", i, "tokens", len(x), len(xv))
    for kw in [dict(), dict(num_cores=3)]:
        for r in [2.0, 4.0]:
            f = mpoize(FFN(teacher.encoder.layer[i]), r, **kw)
            with torch.no_grad(): print(" ", r, kw, "oneshot train", round(nmse(f(x), y), 4), "held", round(nmse(f(xv), yv), 4), f.inter.dense.in_modes, f.inter.dense.bonds, f.out.dense.bonds)

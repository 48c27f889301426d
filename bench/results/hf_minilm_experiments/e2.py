from h import *
import sys
i = int(sys.argv[1]); r = float(sys.argv[2])
x, y = capture(teacher, cal, i); xv, yv = capture(teacher, held, i)
for lr in [1e-3, 3e-3, 1e-2]:
    f = mpoize(FFN(teacher.encoder.layer[i]), r)
    t0 = time.time()
    print("layer", i, "ratio", r, "lr", lr, flush=True)
    train(f, x, y, xv, yv, steps=400, lr=lr, bs=512, log=100)
    print("  sec", round(time.time() - t0, 1), open("/proc/loadavg").read().split()[0], flush=True)

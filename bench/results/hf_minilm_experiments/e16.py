"""Oracle ceiling: all six FFNs at RATIO, whitened low rank fitted (and optionally trained) on the held-out
sentences' own tokens, sequentially; end-to-end mean cosine on those same sentences. No generalization gap
is left, so this bounds what any per-slice low-rank FFN fit of this size reaches on them.
usage: python e16.py RATIO STEPS"""
from h import *
from e3 import lowrank
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
r = float(sys.argv[1]); steps = int(sys.argv[2])
student = copy.deepcopy(teacher)
t0 = time.time()
for i in range(6):
    x, _ = capture(student, held, i)          # the partly compressed student's inputs (sequential)
    _, y = capture(teacher, held, i)          # the teacher's outputs on the same sentences
    with torch.no_grad():
        f = lowrank(FFN(teacher.encoder.layer[i]), x, r)
        n0 = nmse(f(x), y)
    if steps:
        train(f, x, y, steps=steps, lr=3e-4)
    with torch.no_grad():
        print(f"layer {i} tokens {len(x)} init {n0:.4f} -> trained {nmse(f(x), y):.4f}", flush=True)
    install(student, i, f)
print("ratio", r, "steps", steps, "cosine", cosine(student), "sec", round(time.time() - t0), flush=True)

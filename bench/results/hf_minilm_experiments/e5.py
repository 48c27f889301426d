from h import *
from e3 import lowrank
import random, sys
rng = random.Random(0)
def packed(sents, n_rows, seq):
    texts = [" ".join(sents[j] for j in rng.sample(range(len(sents)), 12)) for _ in range(n_rows)]
    e = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
r = float(sys.argv[1]); aug_rows = int(sys.argv[2]); steps = int(sys.argv[3]); seq = sys.argv[4] == "seq"
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 3e-4
encs = [cal] + ([packed(cal_s, aug_rows, 128)] if aug_rows else [])
student = copy.deepcopy(teacher)
t0 = time.time()
for i in range(6):
    src = student if seq else teacher
    xs, ys = zip(*[capture(src, e, i) for e in encs]); x = torch.cat(xs)
    y = torch.cat([capture(teacher, e, i)[1] for e in encs]) if seq else torch.cat(ys)
    xv, yv = capture(teacher, held, i)
    with torch.no_grad():
        f = lowrank(FFN(teacher.encoder.layer[i]), x, r)
        n0 = nmse(f(xv), yv)
    if steps: train(f, x, y, steps=steps, lr=lr, bs=1024)
    with torch.no_grad(): print(f"layer {i} tokens {len(x)} init held {n0:.4f} -> train {nmse(f(x), y):.4f} held {nmse(f(xv), yv):.4f}", flush=True)
    install(student, i, f)
print(sys.argv[1:], cosine(student), "sec", round(time.time() - t0), open("/proc/loadavg").read().split()[0], flush=True)

from h import *
from e3 import lowrank
import random, sys
rng = random.Random(0)
def packed(sents, n_rows, seq):
    texts = []
    for _ in range(n_rows):
        k = rng.sample(range(len(sents)), 12)
        texts.append(" ".join(sents[j] for j in k))
    return tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
aug = packed(cal_s, 100, 128); aug = {"input_ids": aug["input_ids"], "attention_mask": aug["attention_mask"]}
r = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
for i in [5, 0]:
    x, y = capture(teacher, cal, i); xv, yv = capture(teacher, held, i); xa, ya = capture(teacher, aug, i)
    X = torch.cat([x, xa]); Y = torch.cat([y, ya])
    print("tokens", len(x), len(X))
    for name, (tx, ty) in {"orig": (x, y), "aug": (X, Y)}.items():
        with torch.no_grad():
            f = lowrank(FFN(teacher.encoder.layer[i]), tx, r)
            print(i, r, name, "wsvd held", round(nmse(f(xv), yv), 4), flush=True)
        t0 = time.time()
        train(f, tx, ty, xv, yv, steps=300, lr=3e-4, bs=1024, log=100)
        print("  sec", round(time.time() - t0, 1), open("/proc/loadavg").read().split()[0], flush=True)

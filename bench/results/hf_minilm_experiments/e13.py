"""e13: does extra offline text (e10) help the whitened init of one FFN at 2x on the embedded held-out sentences?

python e13.py BLOCK EXTRA_TEXT_FILE  -- whitened low-rank FFN fitted on: the embedded calibration sentences;
the extra sentences alone; both. Held-out NMSE on the embedded held-out sentences and on unseen extra text
(every 5th extra sentence is kept out of the fit).
"""
from h import *
from e11 import fit
from distill.hf import text as T

i, path = int(sys.argv[1]), sys.argv[2]
extra = [l.strip() for l in open(path, encoding="utf-8") if l.strip()]
ex_fit, ex_held = T.split_holdout(extra)
xe, ye = capture(teacher, T.encode_sentences(ex_fit, tok, SEQ), i)
xeh, yeh = capture(teacher, T.encode_sentences(ex_held, tok, SEQ), i)
x, y = capture(teacher, cal, i); xv, yv = capture(teacher, held, i)
for name, xf in [("embedded", x), ("extra", xe), ("both", torch.cat([x, xe]))]:
    with torch.no_grad():
        f = fit(i, xf, 1e-4)
        print(f"block {i} fit on {name} ({len(xf)} tokens): held-out embedded {nmse(f(xv), yv):.4f}, "
              f"held-out extra {nmse(f(xeh), yeh):.4f}", flush=True)

"""e17: word-substitution copies of the embedded corpus's calibration sentences, as extra calibration text.

python e17.py OUT.txt COPIES FRACTION
Each copy of a calibration sentence has FRACTION of its words replaced by words drawn from the calibration
sentences' own vocabulary (held-out sentences are not read). Then: python e9.py block 100 3e-4 OUT.txt
"""
import random, sys
sys.path.insert(0, "/work/main")
from distill.hf import text

out, copies, frac = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cal_s, _ = text.split_holdout(text.split_sentences(text.read_texts()))
rng = random.Random(0)
vocab = [w for s in cal_s for w in s.split()]
lines = []
for s in cal_s:
    words = s.split()
    for _ in range(copies):
        lines.append(" ".join(rng.choice(vocab) if rng.random() < frac else w for w in words))
open(out, "w", encoding="utf-8").write("\n".join(lines) + "\n")
print(len(cal_s), "calibration sentences ->", len(lines), "copies in", out)

"""e9: end-to-end MiniLM FFNs at 2x through distill.hf.pipeline.compress_model (whitened init, sequential).

python e9.py PRESET STEPS LR [EXTRA_TEXT_FILE [MAX_EXTRA]]
RATIO=R (environment, default 2) sets the FFN ratio.
PRESET mlp | block | groupN (groupN: N consecutive blocks per slice; block: whole BertLayer per slice, only its FFN compressed, attention + LayerNorms trained).
EXTRA_TEXT_FILE: more calibration sentences (one per line) added to the embedded corpus's calibration sentences;
the 50 held-out sentences of the embedded corpus stay the evaluation set.
"""
import os, sys, tempfile, time
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/bench")
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
torch.manual_seed(0)
from hf_minilm import minilm_dir
from distill.hf.models import load_hf_model
from distill.hf import evaluate, text
from distill.hf.pipeline import calibration_data, compress_model
import tnkernels

preset, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
group_size = int(preset[5:]) if preset.startswith("group") else 2
preset = "group" if preset.startswith("group") else preset
teacher, tok = load_hf_model(minilm_dir())
calib, held = calibration_data("bert", tok, seq_len=32, num_samples=10**6, batch_size=16)
if len(sys.argv) > 4:
    extra = [l.strip() for l in open(sys.argv[4], encoding="utf-8") if l.strip()]
    extra = extra[: int(sys.argv[5])] if len(sys.argv) > 5 else extra
    cal_s, _ = text.split_holdout(text.split_sentences(text.read_texts()))
    # the embedded calibration sentences first, the extra ones after; the last batch (early stopping) is extra text
    calib = text.batches(text.encode_sentences(cal_s + extra, tok, 32), 16)
print("calibration batches", len(calib), "tokens", sum(int(b["attention_mask"].sum()) for b in calib), flush=True)
t_emb = evaluate.sentence_embeddings(teacher, held)
before = tnkernels.count_params(teacher.encoder)
t0 = time.time()
with tempfile.TemporaryDirectory() as out:
    rep = compress_model(teacher, calib, out, ratio=float(os.environ.get("RATIO", "2")), preset=preset, group_size=group_size, steps=steps, lr=lr, sequential=True,
                         progress=False)
for s in rep["slices"]:
    print(s["slice"], f"nmse {s['initial_nmse']:.4f} -> {s['final_nmse']:.4f} steps {s['steps']} {s['seconds']:.0f}s",
          flush=True)
m = evaluate.embedding_agreement(t_emb, evaluate.sentence_embeddings(teacher, held))
print("args", sys.argv[1:], "encoder params", before, "->", tnkernels.count_params(teacher.encoder))
print("RESULT", sys.argv[1:], "ratio", os.environ.get("RATIO", "2"), {k: round(v, 4) for k, v in m.items()}, "sec", round(time.time() - t0),
      "load", open("/proc/loadavg").read().split()[0], flush=True)

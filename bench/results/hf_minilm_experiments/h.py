"""Token-level harness for MiniLM FFN slice experiments (not committed)."""
import os, sys, time, copy, math
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/bench")
import torch, torch.nn as nn, torch.nn.functional as F
from hf_minilm import minilm_dir
from distill.hf.models import load_hf_model
from distill.hf import text, evaluate
from tnkernels.nn.mpo_linear import MPOLinear

torch.manual_seed(0)
teacher, tok = load_hf_model(minilm_dir())
sents = text.split_sentences(text.read_texts())
cal_s, held_s = text.split_holdout(sents)
SEQ = 32
cal = text.encode_sentences(cal_s, tok, SEQ)
held = text.encode_sentences(held_s, tok, SEQ)
t_emb = evaluate.sentence_embeddings(teacher, held)

@torch.no_grad()
def capture(model, enc, i):
    """(x, y) token rows [N, 384] of layer i's FFN (input = intermediate input, output = layer output)."""
    store = {}
    L = model.encoder.layer[i]
    h1 = L.intermediate.register_forward_hook(lambda m, a, o: store.__setitem__("x", a[0]))
    h2 = L.output.register_forward_hook(lambda m, a, o: store.__setitem__("y", o))
    model(**enc); h1.remove(); h2.remove()
    m = enc["attention_mask"].bool()
    return store["x"][m].clone(), store["y"][m].clone()

class FFN(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.inter = copy.deepcopy(layer.intermediate); self.out = copy.deepcopy(layer.output)
    def forward(self, x):
        return self.out(self.inter(x), x)

def nmse(p, y):
    return (((p - y) ** 2).mean() / y.var(0, unbiased=False).mean()).item()

def mpoize(ffn, ratio, **kw):
    ffn.inter.dense = MPOLinear.from_linear(ffn.inter.dense, ratio=ratio, **kw)
    ffn.out.dense = MPOLinear.from_linear(ffn.out.dense, ratio=ratio, **kw)
    return ffn

def train(ffn, x, y, xv=None, yv=None, steps=500, lr=1e-3, bs=None, wd=0.0, warm=10, log=0):
    params = [p for p in ffn.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    f = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    sch = torch.optim.lr_scheduler.LambdaLR(opt, f)
    var = y.var(0, unbiased=False).mean()
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        if bs:
            idx = torch.randint(len(x), (bs,), generator=g); xb, yb = x[idx], y[idx]
        else:
            xb, yb = x, y
        loss = ((ffn(xb) - yb) ** 2).mean() / var
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sch.step()
        if log and (s + 1) % log == 0:
            with torch.no_grad():
                print(f"  step {s+1} train {nmse(ffn(x), y):.4f}" + (f" held {nmse(ffn(xv), yv):.4f}" if xv is not None else ""), flush=True)
    return ffn

class Wrap(nn.Module):
    """Put a FFN student back in a BertLayer: intermediate + output replaced by a module pair."""

def install(model, i, ffn):
    L = model.encoder.layer[i]
    L.intermediate = ffn.inter; L.output = ffn.out

def cosine(model):
    return evaluate.embedding_agreement(t_emb, evaluate.sentence_embeddings(model, held))

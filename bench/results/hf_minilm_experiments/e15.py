"""e15: where is the compressed model's error? Final hidden states split by token kind ([CLS], [SEP], words).

python e15.py COMPRESSED_DIR  -- a `tnk compress --model <MiniLM> ...` output's compressed/ folder.
Prints each kind's share of the tokens, its share of the squared error, its mean squared norm, and the mean
cosine of embeddings pooled over word tokens only (a diagnostic, not the metric).
"""
from h import *
import tnkernels
from transformers import AutoModel

student = tnkernels.load_compressed(AutoModel.from_pretrained(str(minilm_dir())), sys.argv[1]).eval()
with torch.no_grad():
    t = teacher(**held).last_hidden_state; s = student(**held).last_hidden_state
ids, m = held["input_ids"], held["attention_mask"].bool()
kinds = {"[CLS]": (ids == tok.cls_token_id) & m, "[SEP]": (ids == tok.sep_token_id) & m}
kinds["words"] = m & ~kinds["[CLS]"] & ~kinds["[SEP]"]
err = ((s - t) ** 2).sum(-1); total = err[m].sum()
for k, sel in kinds.items():
    print(f"{k}: {sel.sum().item() / m.sum().item():.3f} of tokens, {err[sel].sum().item() / total.item():.3f} of the "
          f"squared error, mean |h|^2 {(t[sel] ** 2).sum(-1).mean().item():.1f}, per-token NMSE "
          f"{(err[sel].mean() / (t[m] ** 2).sum(-1).mean()).item():.4f}")
def pooled(h, sel):
    w = sel.unsqueeze(-1).float(); return F.normalize((h * w).sum(1) / w.sum(1), dim=-1)
print("mean cosine, all tokens pooled", F.cosine_similarity(pooled(t, m), pooled(s, m)).mean().item())
print("mean cosine, word tokens pooled", F.cosine_similarity(pooled(t, kinds["words"]), pooled(s, kinds["words"])).mean().item())

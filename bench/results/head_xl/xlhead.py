"""The --head slice at GPT-2 XL width (hidden 1600, the 50257-token head), random weights, one block: time and
peak RSS of distill_head (capture, whitened init, 10 training steps). Run: python xlhead.py (log: xlhead.log)."""
import sys, time, resource, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from distill.hf.models import build_from_config
from distill.hf.head import distill_head
torch.manual_seed(0)
t0 = time.perf_counter()
model = build_from_config("gpt2", n_layer=1, n_embd=1600, n_head=25, n_inner=6400, vocab_size=50257)
print("build s %.1f rss GiB %.2f" % (time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20), flush=True)
calib = [{"input_ids": torch.randint(0, 50257, (2, 64))} for _ in range(8)]  # 1024 tokens
t0 = time.perf_counter()
student, stats = distill_head(model, calib, ratio=2, steps=10, lr=3e-4, batch_tokens=256)
print("head slice s %.1f" % (time.perf_counter() - t0), {k: (round(v, 5) if isinstance(v, float) else v) for k, v in stats.items()})
print("peak RSS GiB %.2f" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))

"""The --head slice's learning rate on the bench GPT-2 teacher (bench/hf_gpt2.py's cached teacher, 512-token
vocabulary): held-out KL of the head alone (inputs from the uncompressed blocks) after 100 steps, per lr and
ratio. Run: python head_lr.py (log: head_lr.log)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch

from distill.hf import text
from distill.hf.head import distill_head
import hf_gpt2

torch.set_num_threads(1)
args = hf_gpt2.argparse.Namespace(vocab=512, n_layer=4, n_embd=256, n_head=8, n_inner=1024, seq_len=64,
                                  batch_size=8, teacher_steps=250, teacher_lr=1e-3)
calib_t, _ = text.split_holdout(text.read_texts())
teacher, tok, _ = hf_gpt2.load_or_train_teacher(args, calib_t)
calib = text.batches(text.causal_lm_blocks(calib_t, tok, args.seq_len), args.batch_size)
for ratio in (2, 4, 8):
    for lr in (3e-4, 1e-3, 3e-3, 1e-2):
        _, st = distill_head(teacher, calib, ratio=ratio, steps=100, lr=lr)
        print(f"ratio {ratio} lr {lr:g}: held-out KL {st['initial_kl']:.5f} -> {st['final_kl']:.5f}", flush=True)

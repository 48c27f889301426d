"""GPT-2 small config (12 blocks, hidden 768, MLP 3072), random weights: perplexity before and after
compressing its MLPs, slice-wise vs one-shot vs global fine-tuning (same wall-clock time as slice-wise).

The tokenizer is a byte-level BPE trained on the embedded corpus (no download). Perplexity is measured on the
corpus's held-out paragraphs; with random weights the teacher's perplexity is close to the vocabulary size, so
the mean KL divergence of the student's next-token distribution from the teacher's is reported as well (the
number that shows how far compression moved the model).

    python bench/hf_gpt2.py --ratio 2 --steps 100 --out bench/results/hf_gpt2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tnkernels  # noqa: E402
from distill.hf import baselines, evaluate, text  # noqa: E402
from distill.hf.models import build_from_config  # noqa: E402
from distill.hf.pipeline import compress_model  # noqa: E402


def corpus_tokenizer(vocab: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text.read_texts(), vocab_size=vocab, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@torch.no_grad()
def mean_kl(teacher, student, blocks: torch.Tensor) -> float:
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    total, n = 0.0, 0
    for i in range(0, blocks.shape[0], 8):
        ids = blocks[i : i + 8]
        lt = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        ls = F.log_softmax(student(input_ids=ids).logits.float(), -1)
        total += (lt.exp() * (lt - ls)).sum(-1).sum().item()
        n += ids.numel()
    return total / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", default=None, help="comma-separated block indices to compress (default: all)")
    p.add_argument("--out", default="bench/results/hf_gpt2.json")
    args = p.parse_args()
    tok = corpus_tokenizer(args.vocab)
    teacher = build_from_config(
        "gpt2",
        n_layer=args.n_layer,
        n_embd=768,
        n_head=12,
        n_inner=3072,
        vocab_size=len(tok),
        n_positions=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    calib_t, held_t = text.split_holdout(text.read_texts())
    calib = text.batches(text.causal_lm_blocks(calib_t, tok, args.seq_len), 8)
    held = text.causal_lm_blocks(held_t, tok, args.seq_len)
    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "note": "2 CPU cores shared with 5 other engineers' jobs; timings are noisy",
        },
        "command": " ".join(["python"] + sys.argv),
        "config": "GPT-2 small shapes, random weights",
        "vocab": len(tok),
        "calib_tokens": sum(b["input_ids"].numel() for b in calib),
        "heldout_tokens": held.numel(),
        "ratio": args.ratio,
        "layers": layers or "all",
        "teacher_perplexity": evaluate.perplexity(teacher, held),
        "runs": [],
    }
    print(res, flush=True)

    def record(method: str, model, **extra) -> None:
        row = {
            "method": method,
            "perplexity": evaluate.perplexity(model, held),
            "kl_to_teacher": mean_kl(teacher, model, held),
            **extra,
        }
        res["runs"].append(row)
        print(row, flush=True)
        tmp = Path(args.out + ".tmp")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, args.out)

    student = copy.deepcopy(teacher)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        rep = compress_model(
            student,
            calib,
            out,
            ratio=args.ratio,
            preset="mlp",
            layers=layers,
            steps=args.steps,
            progress=False,
        )
        total = time.perf_counter() - t0
    train_s = sum(s["seconds"] for s in rep["slices"])
    record(
        "slice-wise",
        student,
        seconds=total,
        train_seconds=train_s,
        slice_nmse=[(s["slice"], s["initial_nmse"], s["final_nmse"]) for s in rep["slices"]],
        params_before=rep["params_before"],
        params_after=rep["params_after"],
    )
    # one-shot / global tensorize exactly the layers the slice-wise run did
    rules = {
        k: v
        for k, v in baselines.ffn_rules(teacher, args.ratio).items()
        if layers is None or int(k.split(".")[1]) in layers
    }
    shot = copy.deepcopy(teacher)
    tnkernels.tensorize(shot.transformer, rules=rules)
    record("one-shot", shot)
    baselines.global_finetune(shot, teacher, calib, seconds=train_s, lr=1e-4)
    record("global", shot, seconds=train_s)


if __name__ == "__main__":
    main()

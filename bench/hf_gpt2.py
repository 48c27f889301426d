"""GPT-2 trained briefly on the embedded corpus: held-out perplexity of the teacher, and after compressing every
block's MLP (optionally attention too) at ``--ratio``: one-shot, slice-wise, and global fine-tuning given the
same wall-clock time as slice-wise.

Why a trained teacher: with random weights perplexity sits near the vocabulary size whatever compression does.
Here the teacher is a GPT-2 config trained from scratch on the calibration part of the embedded corpus
(``distill/hf/data/corpus.txt``; every 5th paragraph is held out for perplexity and never trained on). The default
config is smaller than GPT-2 small: 4 blocks, hidden 256, MLP 1024, 8 heads, vocabulary 512 (a byte-level BPE
trained on the corpus, no download). Measured on the shared 2-core CPU (load average about 10), one training
step of GPT-2 small's widths (hidden 768, MLP 3072) with 4 blocks took 14 s, too slow to train a teacher here;
``--n-embd 768 --n-head 12 --n-inner 3072 --n-layer 12`` gives GPT-2 small's shapes on a faster machine. The
vocabulary is 512 because the corpus is tiny (7.7k tokens at that size): with 2048 (the BPE trainer stops at
1409) the teacher (best validation state, step 50 of 80) had held-out perplexity 586 of a possible 1409; with 512
the default teacher reaches 112.6 of 512 on held-out text (bench/results/hf_gpt2.json). The teacher is cached under
``$TNK_CACHE_DIR/teachers/`` (default ``~/.cache/tnkernels``) with its tokenizer and training log, so reruns
skip the training.

Time budget: slice-wise pays feature capture + per-slice training (``compress_model``); global fine-tuning gets
exactly that many seconds on top of the same one-shot decomposition. Both pay the decomposition once.

    python bench/hf_gpt2.py --ratio 2 --steps 100 --out bench/results/hf_gpt2.json
    python bench/hf_gpt2.py --ratio 2 --steps 100 --preset block --attention --out bench/results/hf_gpt2_attn.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
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

from distill._atomic import atomic_write_text  # noqa: E402
from distill.hf import baselines, evaluate, text  # noqa: E402
from distill.hf.models import build_from_config  # noqa: E402
from distill.hf.pipeline import compress_model  # noqa: E402
from distill.teacher import cache_dir  # noqa: E402

TEACHER_RECIPE = "v1"  # bump when train_teacher changes, so a stale cached teacher is not reused


def corpus_tokenizer(vocab: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text.read_texts(), vocab_size=vocab, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def lm_loss(lm, ids: torch.Tensor) -> torch.Tensor:
    logits = lm(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_teacher(lm, blocks: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int = 0) -> dict:
    """Train ``lm`` from scratch on ``blocks`` (AdamW, warm-up + cosine, dropout on). Every 10th block is a
    validation block: the state with the best validation perplexity is kept (the held-out text is not used)."""
    val = blocks[::10]
    train = torch.cat([blocks[i : i + 1] for i in range(len(blocks)) if i % 10])
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, curve = math.inf, None, []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        lm.train()
        ids = train[torch.randint(len(train), (batch_size,), generator=gen)]
        loss = lm_loss(lm, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps:
            val_ppl = evaluate.perplexity(lm, val)
            curve.append({"step": step, "train_loss": loss.item(), "val_perplexity": val_ppl})
            print(f"teacher step {step}: train loss {loss.item():.3f}, val ppl {val_ppl:.1f}", flush=True)
            if val_ppl < best:
                best, best_state = val_ppl, copy.deepcopy(lm.state_dict())
    lm.load_state_dict(best_state)
    lm.eval()
    return {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "train_blocks": len(train),
        "val_blocks": len(val),
        "best_val_perplexity": best,
        "curve": curve,
    }


def teacher_cache_path(args) -> Path:
    """Cache folder of the teacher: every setting that changes the trained weights is in the name."""
    corpus_hash = hashlib.sha256(text.DEFAULT_CORPUS.read_bytes()).hexdigest()[:12]
    key = (
        f"gpt2corpus-L{args.n_layer}-d{args.n_embd}-f{args.n_inner}-v{args.vocab}-T{args.seq_len}"
        f"-s{args.teacher_steps}-lr{args.teacher_lr:g}-b{args.batch_size}-{corpus_hash}-{TEACHER_RECIPE}"
    )
    return cache_dir() / "teachers" / key


def load_or_train_teacher(args, calib_texts: list[str]):
    """(teacher LM in eval mode, tokenizer, training log): from the cache, else trained now and cached."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = teacher_cache_path(args)
    if (path / "train_log.json").is_file():  # written last: the folder is complete
        lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return lm, tok, {**json.loads((path / "train_log.json").read_text()), "cache": str(path), "cached": True}
    tok = corpus_tokenizer(args.vocab)
    lm, log = build_teacher(args, tok, text.causal_lm_blocks(calib_texts, tok, args.seq_len))
    path.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "train_log.json").write_text(json.dumps(log, indent=2))
    return lm, tok, {**log, "cache": str(path), "cached": False}


def build_teacher(args, tok, calib_blocks: torch.Tensor):
    lm = build_from_config(
        "gpt2",
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_inner=args.n_inner,
        vocab_size=len(tok),
        n_positions=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    log = train_teacher(lm, calib_blocks, steps=args.teacher_steps, lr=args.teacher_lr, batch_size=args.batch_size)
    return lm, log


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


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=100, help="training steps per slice")
    p.add_argument("--lr", type=float, default=1e-3, help="slice-wise learning rate")
    p.add_argument("--global-lr", type=float, default=1e-4, help="global fine-tuning learning rate")
    p.add_argument("--preset", default="mlp", help="slice preset (use block with --attention)")
    p.add_argument("--attention", action="store_true", help="also tensorize attention projections")
    p.add_argument("--num-cores", type=int, default=None, help="MPO cores per layer (default: planner)")
    p.add_argument(
        "--head", action="store_true", help="slice-wise also tensorizes the LM head, untied (distill/hf/head.py)"
    )
    p.add_argument(
        "--init",
        default="plain",
        help="slice-wise initialisation, passed to compress_model where it has an init argument (plain: TT-SVD "
        "of each weight, the same start as one-shot and global)",
    )
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-inner", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--teacher-steps", type=int, default=250)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--out", default="bench/results/hf_gpt2.json")
    args = p.parse_args()
    if args.attention and args.preset == "mlp":
        p.error(
            "--attention with --preset mlp tensorizes nothing more (attention is not in an MLP slice); "
            "use --preset block"
        )
    init_kwargs = {}
    if "init" in inspect.signature(compress_model).parameters:
        init_kwargs["init"] = args.init
    elif args.init != "plain":
        p.error(f"--init {args.init}: this compress_model has no init argument (only plain TT-SVD)")
    torch.manual_seed(0)
    calib_t, held_t = text.split_holdout(text.read_texts())
    teacher, tok, teacher_log = load_or_train_teacher(args, calib_t)
    calib_blocks = text.causal_lm_blocks(calib_t, tok, args.seq_len)
    calib = text.batches(calib_blocks, args.batch_size)
    held = text.causal_lm_blocks(held_t, tok, args.seq_len)
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "hardware": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "note": "timings depend on the machine's load (loadavg fields); compare side by side",
        },
        "loadavg_start": loadavg(),
        "config": (
            f"GPT-2 config: {args.n_layer} blocks, hidden {args.n_embd}, MLP {args.n_inner}, {args.n_head} heads, "
            f"vocab {len(tok)} (byte-level BPE trained on the corpus), trained from scratch on the calibration "
            "part of the embedded corpus"
        ),
        "teacher_training": teacher_log,
        "calib_tokens": calib_blocks.numel(),
        "heldout_tokens": held.numel(),
        "ratio": args.ratio,
        "preset": args.preset,
        "attention": args.attention,
        "steps_per_slice": args.steps,
        "teacher_perplexity": evaluate.perplexity(teacher, held),
        # the text the teacher was trained on: it fits it far better than held-out text, so this shows how much
        # of what the teacher learned survives compression
        "teacher_calib_perplexity": evaluate.perplexity(teacher, calib_blocks),
        "runs": [],
    }
    print(json.dumps({k: v for k, v in res.items() if k != "teacher_training"}), flush=True)

    def record(method: str, model, **extra) -> None:
        row = {
            "method": method,
            "perplexity": evaluate.perplexity(model, held),
            "calib_perplexity": evaluate.perplexity(model, calib_blocks),
            "kl_to_teacher": mean_kl(teacher, model, held),
            **extra,
            "loadavg": loadavg(),
        }
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
        atomic_write_text(args.out, json.dumps(res, indent=2))

    t0 = time.perf_counter()
    shot = baselines.one_shot(teacher, args.ratio, attention=args.attention, num_cores=args.num_cores)
    record("one-shot", shot, seconds=time.perf_counter() - t0)

    student = copy.deepcopy(teacher)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        rep = compress_model(
            student,
            calib,
            out,
            ratio=args.ratio,
            preset=args.preset,
            attention=args.attention,
            steps=args.steps,
            lr=args.lr,
            num_cores=args.num_cores,
            progress=False,
            **init_kwargs,
            **({"head": True} if args.head else {}),
        )
        total = time.perf_counter() - t0
    train_s = sum(s["seconds"] for s in rep["slices"])
    capture_s = rep["capture_seconds_rank0"]
    record(
        "slice-wise",
        student,
        init=rep.get("init", "plain"),
        seconds=total,
        capture_seconds=capture_s,
        train_seconds=train_s,
        slice_nmse=[
            (s["slice"], s["initial_nmse"], s["final_nmse"], s["steps"]) for s in rep["slices"] if "initial_nmse" in s
        ],
        head_kl=[(s["initial_kl"], s["final_kl"], s["steps"]) for s in rep["slices"] if "initial_kl" in s],
        params_before=rep["params_before"],
        params_after=rep["params_after"],
    )
    budget = capture_s + train_s  # what slice-wise spent beyond the decomposition both methods pay
    stats = baselines.global_finetune(shot, teacher, calib, seconds=budget, lr=args.global_lr)
    record("global", shot, budget_seconds=budget, **stats)


if __name__ == "__main__":
    main()

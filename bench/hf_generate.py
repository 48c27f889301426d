"""Text generation latency of GPT-2 and Llama-layout decoders, dense against tensorized: the decode loop, where
every layer sees one row.

    pip install transformers
    python bench/hf_generate.py [--size small] [--ratios 4 16] [--threads 1] [--out bench/results/x.md]

A model of the chosen size is built from its config (random weights: no checkpoint is downloaded here; speed does
not depend on the weights' values): GPT-2 small or medium, or the published shapes of SmolLM-135M and TinyLlama-1.1B
(Llama layout). Every projection of the blocks (GPT-2: attention `c_attn` and `c_proj`, MLP `c_fc` and `c_proj`;
Llama: `q/k/v/o_proj`, `gate/up/down_proj`) is tensorized with `tnkernels.tensorize(model, ratio=R)`; the
`lm_head` stays dense (GPT-2's, tied, 768 x 50257, reads at one row as many bytes as half the blocks, which bounds
the speed-up); with --head it is untied from the input embedding and tensorized too (speed only; `tnk compress
--head` distills it). Greedy
`generate()` with the KV cache, a 16-token prompt and exactly `--new-tokens` new tokens; dense and tensorized
are interleaved over rounds and the fastest round of each is kept. The last column times the head alone on one
hidden state per sequence. Prefill is timed apart (`max_new_tokens=1`), so
the decode time per token is (generate - prefill) / (new tokens - 1). Only speed is measured: slice-wise
distillation is what recovers accuracy at a ratio (bench/hf_gpt2.py).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ab_common import Table, best_us  # noqa: E402
from distill.hf.models import build_from_config  # noqa: E402
from tnkernels import tensorize  # noqa: E402

SIZES = {  # (family, config): the published shapes
    "small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12)),
    "medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16)),
    "tiny": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512)),  # the smoke test's
    "smollm-135m": ("llama", dict(
        num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    )),
    "tinyllama-1.1b": ("llama", dict(
        num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
    )),
    "tiny-llama": ("llama", dict(  # the smoke test's
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512,
    )),
}  # fmt: skip
RULES = {
    "gpt2": {"*.attn.c_attn": {}, "*.attn.c_proj": {}, "*.mlp.c_fc": {}, "*.mlp.c_proj": {}},
    "llama": {f"*.{p}_proj": {} for p in ("q", "k", "v", "o", "gate", "up", "down")},
}
PROMPT = 16


def _generate_s(model, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True
    )
    elapsed = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {new_tokens}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="model shape (default: GPT-2 small, 124M)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[4, 16], help="compression ratio of every block layer")
    ap.add_argument("--batch", type=int, default=1, help="sequences generated together (default 1)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument(
        "--head",
        action="store_true",
        help="also tensorize lm_head, untied from the input embedding first (speed only; `tnk compress --head` "
        "distills it)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest of each is kept")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (the first new token comes from the prefill)")
    torch.set_num_threads(args.threads)
    family, config = SIZES[args.size]
    dense = build_from_config(family, **config)
    n_params = sum(p.numel() for p in dense.parameters())
    tied = dense.config.tie_word_embeddings
    name = f"GPT-2 {args.size}" if family == "gpt2" else args.size
    table = Table(
        f"{name} generation latency, dense vs tensorized" + (" (blocks and lm_head)" if args.head else ""),
        args.threads,
        f"{n_params / 1e6:.1f}M parameters (lm_head {'tied to the embedding, ' if tied else ''}dense). Greedy "
        "generate(), KV cache, "
        f"batch {args.batch}, {PROMPT}-token prompt, {args.new_tokens} new tokens; ms, fastest of "
        f"{args.rounds} interleaved rounds; the last column is the dense head alone. Command: "
        f"`python bench/hf_generate.py --size {args.size}{' --head' if args.head else ''}`.",
        ["ratio", "tensorized params", "dense prefill ms", "tnk prefill ms", "dense ms/token", "tnk ms/token",
         "decode speed-up", "dense tokens/s", "tnk tokens/s", "lm_head ms/token"],
    )  # fmt: skip
    ids = torch.randint(100, 500, (args.batch, PROMPT))
    with torch.no_grad():  # the dense head's share of a decode step: what no block compression can remove
        hidden = torch.randn(args.batch, 1, dense.config.hidden_size)
        head_ms = best_us(lambda: dense.lm_head(hidden)) / 1e3
    for ratio in args.ratios:
        model = copy.deepcopy(dense)
        rules = dict(RULES[family])
        if args.head:  # tensorize() leaves tied layers dense: give the head its own copy of the weight
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            rules["lm_head"] = {}
        report = tensorize(model, ratio=ratio, rules=rules)
        if len(report.tensorized) != len(RULES[family]) * dense.config.num_hidden_layers + args.head:
            raise SystemExit(f"not every block layer was tensorized at ratio {ratio:g}:\n{report}")
        best = {k: float("inf") for k in ("dense_pre", "tnk_pre", "dense_gen", "tnk_gen")}
        with torch.no_grad():
            for m in (dense, model):  # warm up: plans, caches, allocator
                _generate_s(m, ids, 2)
            for _ in range(args.rounds):
                for name, m in (("dense", dense), ("tnk", model)):
                    best[f"{name}_pre"] = min(best[f"{name}_pre"], _generate_s(m, ids, 1))
                    best[f"{name}_gen"] = min(best[f"{name}_gen"], _generate_s(m, ids, args.new_tokens))
        per_token = {k: (best[f"{k}_gen"] - best[f"{k}_pre"]) / (args.new_tokens - 1) for k in ("dense", "tnk")}
        # A decode time is a difference of two timings: on a tiny model or with few rounds, noise can make it
        # non-positive, and a ratio of such numbers would be a made-up result.
        if min(per_token.values()) > 0:
            decode = [
                f"{per_token['dense'] * 1e3:.2f}",
                f"{per_token['tnk'] * 1e3:.2f}",
                f"{per_token['dense'] / per_token['tnk']:.2f}x",
                f"{args.batch / per_token['dense']:.0f}",
                f"{args.batch / per_token['tnk']:.0f}",
            ]
        else:
            decode = ["noise: raise --new-tokens / --rounds"] + ["-"] * 4
        table.row(
            f"{ratio:g}",
            f"{report.params_before / 1e6:.1f}M -> {report.params_after / 1e6:.1f}M",
            f"{best['dense_pre'] * 1e3:.1f}",
            f"{best['tnk_pre'] * 1e3:.1f}",
            *decode,
            f"{head_ms:.2f}",
        )
    table.write(args.out)


if __name__ == "__main__":
    main()

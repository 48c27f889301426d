"""A/B of the low-rank layer's C++ side (csrc/low_rank.cpp) against its Python side (torch_low_rank.py).

    python bench/low_rank_fn_ab.py [--threads 1] [--rows 1 64 1024] [--out bench/results/low_rank_fn_ab.md]

MPOLinear (low-rank structure from `from_linear(ratio=R)`) on the grid's linear shapes, with
torch_low_rank.cpp_enabled off and on, interleaved: a training step (forward, then backward with a dense upstream
gradient, every parameter and the input needing gradients: the C++ autograd Function against LowRankFunction) and
an inference forward under no_grad (one C++ call against the Python products). Both sides run the same products
on the same kernels (torch_low_rank.plan_flags), so the difference is the cost of the autograd node and of
issuing the tensor calls from Python. Times are the fastest of several batches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ab_common import Table, best_us  # noqa: E402
from tnkernels import MPOLinear  # noqa: E402
from tnkernels.ops.mpo import torch_low_rank  # noqa: E402

LINEAR = [
    ("resnet34-fc 512->1000", 512, 1000),
    ("minilm 384->1536", 384, 1536),
    ("minilm 1536->384", 1536, 384),
    ("gpt2 768->3072", 768, 3072),
    ("gpt2-xl 1600->6400", 1600, 6400),
]


def _ab(fn, rounds: int = 3) -> tuple[float, float]:
    python = cpp = float("inf")
    try:
        for _ in range(rounds):
            torch_low_rank.cpp_enabled = False
            python = min(python, best_us(fn))
            torch_low_rank.cpp_enabled = True
            cpp = min(cpp, best_us(fn))
    finally:
        torch_low_rank.cpp_enabled = torch_low_rank._HAS_CPP
    return python, cpp


def _steps(ratios, row_counts):
    for name, n_in, n_out in LINEAR:
        for ratio in ratios:
            layer = MPOLinear.from_linear(nn.Linear(n_in, n_out), ratio=ratio)
            if len(layer.cores) != 2 or layer.cores[0].shape[2] != 1:
                continue  # not a low-rank structure: the C++ Function does not apply
            for rows in row_counts:
                if rows * max(n_in, n_out) > 1 << 22:
                    continue  # the largest layers at 1024 rows: milliseconds a step, the Function's cost is noise
                x = torch.randn(rows, n_in, requires_grad=True)
                gy = torch.randn(rows, n_out)

                def step(layer=layer, x=x, gy=gy):
                    for p in layer.parameters():
                        p.grad = None
                    x.grad = None
                    layer(x).backward(gy)

                def forward(layer=layer, x=x):
                    with torch.no_grad():
                        layer(x)

                label = f"{name}, ratio {ratio} (rank {layer.bonds[0]})"
                yield label, rows, "forward+backward", step
                yield label, rows, "forward (no_grad)", forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the least noisy)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 16, 64], help="compression ratios")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 1024], help="rows (batch x tokens) per call")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    if not torch_low_rank._HAS_CPP:
        sys.exit("low_rank_fn_ab: the native extension is not built (pip install -e . builds it; docs/native.md)")
    torch.set_num_threads(args.threads)
    table = Table(
        "Low-rank layer, Python against C++",
        args.threads,
        "Microseconds per call, fastest batch, Python and C++ interleaved.",
        ["layer", "rows", "pass", "Python µs", "C++ µs", "Python / C++"],
    )
    ratios = [int(r) if r == int(r) else r for r in args.ratios]
    for label, rows, what, fn in _steps(ratios, args.rows):
        python, cpp = _ab(fn)
        table.row(label, rows, what, f"{python:.1f}", f"{cpp:.1f}", f"{python / cpp:.2f}x")
    table.write(args.out)


if __name__ == "__main__":
    main()

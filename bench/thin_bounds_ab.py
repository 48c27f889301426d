"""A/B of the thin kernels' bounds: this machine's measured table against the fixed (Xeon) rules.

    python bench/thin_bounds_ab.py [--threads 1] [--out bench/results/thin_bounds_ab.md]

MPOLinear (low-rank structure from `from_linear(ratio=R)`) forward under no_grad and a training step (forward +
backward, every parameter and the input needing gradients), with tnkernels/ops/mpo/thin_bounds.py's measured
table and with its fixed rules (FixedBounds, what TNK_THIN_BOUNDS=fixed selects), interleaved. The measured
table's entries for these shapes are measured on first use (seconds, once per machine; cached on disk). Times
are the fastest of several batches.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ab_common import Table, best_us  # noqa: E402
from tnkernels import MPOLinear  # noqa: E402
from tnkernels.ops.mpo import thin_bounds  # noqa: E402

CASES = [  # (in, out, ratio, rows): the grid's low-rank layers at ratios 16 and 64
    (512, 1000, 64, 64),
    (512, 1000, 64, 1024),
    (384, 1536, 64, 64),
    (384, 1536, 64, 1024),
    (1536, 384, 64, 1024),
    (768, 3072, 64, 1024),
    (384, 1536, 16, 1024),
    (1536, 384, 16, 64),
    (768, 3072, 16, 1024),
]


def _ab(fn, measured, fixed, rounds: int = 3) -> tuple[float, float]:
    t_fixed = t_measured = float("inf")
    for _ in range(rounds):
        thin_bounds.use(fixed)
        t_fixed = min(t_fixed, best_us(fn))
        thin_bounds.use(measured)
        t_measured = min(t_measured, best_us(fn))
    return t_fixed, t_measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the least noisy)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    if os.environ.get("TNK_THIN_BOUNDS") == "fixed":
        sys.exit("thin_bounds_ab: unset TNK_THIN_BOUNDS, which pins the fixed rules on both sides")
    torch.set_num_threads(args.threads)
    measured, fixed = thin_bounds.bounds(), thin_bounds.FixedBounds()
    if measured.source != "measured":
        sys.exit("thin_bounds_ab: no measured table (is the native extension built? see docs/native.md)")
    table = Table(
        "Thin kernels' bounds, measured against fixed",
        args.threads,
        "Microseconds per call, fastest batch, both tables interleaved.",
        ["layer", "rows", "pass", "fixed µs", "measured µs", "fixed / measured"],
    )
    for n_in, n_out, ratio, rows in CASES:
        layer = MPOLinear.from_linear(nn.Linear(n_in, n_out), ratio=ratio)
        x = torch.randn(rows, n_in, requires_grad=True)
        gy = torch.randn(rows, n_out)

        def forward(layer=layer, x=x):
            with torch.no_grad():
                layer(x)

        def step(layer=layer, x=x, gy=gy):
            for p in layer.parameters():
                p.grad = None
            x.grad = None
            layer(x).backward(gy)

        thin_bounds.use(measured)
        step()  # the measured table's entries for this shape, before any timing
        for what, fn in (("forward (no_grad)", forward), ("forward+backward", step)):
            a, b = _ab(fn, measured, fixed)
            label = f"{n_in}->{n_out}, ratio {ratio} (rank {layer.bonds[0]})"
            table.row(label, rows, what, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x")
    thin_bounds.use(None)
    table.write(args.out)


if __name__ == "__main__":
    main()

"""Tucker ranks at the same ratio, timed: does the rank pair change the speed of the three convolutions?

    python bench/tucker_rank_ab.py                         # ResNet-34's 64-channel 3x3 conv, batch 1, 56x56
    python bench/tucker_rank_ab.py --channels 128 --size 28 --pairs 76x76 64x90

Plain F.conv2d calls (1x1 projection in, the core's 3x3 convolution, 1x1 projection out), forward and backward,
against the dense 3x3 convolution, interleaved over rounds (best call per provider). `tucker_ranks_for_ratio` picks
(39, 38) at ratio 2 for 64 channels; on the EPYC VM oneDNN ran such a core at about half the rate of a 32-channel
one, so another pair with about the same parameter count can be much faster: what TuckerConv2d.from_conv(
prefer="speed") uses (ops/tucker/ranks.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ab_common import best_single_call, positive_int  # noqa: E402


def rank_pair(text: str) -> tuple[int, int]:
    """argparse type: R_out x R_in, e.g. 39x38."""
    try:
        r_out, r_in = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected R_outxR_in such as 39x38, got {text!r}") from None
    if min(r_out, r_in) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be at least 1, got {text!r}")
    return r_out, r_in


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=56, help="height and width of the input")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--pairs",
        nargs="+",
        type=rank_pair,
        default=[(39, 38), (32, 46), (44, 33), (40, 37), (48, 30)],
        help="R_out x R_in",
    )
    p.add_argument("--rounds", type=positive_int, default=4)
    p.add_argument("--threads", type=positive_int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    c, n, s = args.channels, args.batch, args.size
    x = torch.randn(n, c, s, s, requires_grad=True)
    g = torch.randn(n, c, s, s)
    w = torch.randn(c, c, 3, 3, requires_grad=True)
    providers = {"dense": lambda: F.conv2d(x, w, padding=1).backward(g)}
    for r_out, r_in in args.pairs:
        pair = f"{r_out}x{r_in}"
        a = torch.randn(r_in, c, 1, 1, requires_grad=True)
        core = torch.randn(r_out, r_in, 3, 3, requires_grad=True)
        b = torch.randn(c, r_out, 1, 1, requires_grad=True)
        ratio = c * c * 9 / (r_out * r_in * 9 + c * (r_out + r_in))
        providers[f"{pair} (ratio {ratio:.2f})"] = lambda a=a, core=core, b=b: F.conv2d(
            F.conv2d(F.conv2d(x, a), core, padding=1), b
        ).backward(g)
    best = dict.fromkeys(providers, float("inf"))
    for _ in range(args.rounds):  # interleaved: a burst of load spoils one round of every provider alike
        for name, fn in providers.items():
            best[name] = min(best[name], best_single_call(fn, 3) * 1e6)
    rows = [{"provider": k, "us": v, "vs_dense": best["dense"] / v} for k, v in best.items()]
    print(f"{c} channels, batch {n}, {s}x{s}, {args.threads} thread(s), forward + backward, {args.rounds} rounds")
    for r in rows:
        print(f"  {r['provider']:<22s} {r['us']:9.0f} us  {r['vs_dense']:.2f}x dense")
    return rows


if __name__ == "__main__":
    main()

"""A/B of the native thin GEMMs (csrc/thin_gemm.cpp) against torch, per product and through MPOLinear.

    python bench/thin_gemm_ab.py                  # one thread, the grid's layers at ratios 16 and 64
    python bench/thin_gemm_ab.py --threads 2 --rows 64 1024

Per product: x A, h B + bias (against addmm) and dy B^T at ranks 4-16, torch / native in microseconds. Through the
layer: MPOLinear.from_linear(ratio=R) forward and forward+backward with `thin_native.enabled` off and on, visited in
turn over two rounds (best of each), so that a drift of the machine hits both sides. Prints a table; timings are
the fastest call of repeated 20 ms batches, as in bench/run_grid.py.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from tnkernels.nn import MPOLinear
from tnkernels.ops.mpo import thin_native

LAYERS = ((1536, 384), (384, 1536), (768, 3072), (3072, 768), (512, 1000), (1600, 6400))


def best_us(fn, *args, rounds: int = 5, batch_s: float = 0.02) -> float:
    """Fastest time of fn(*args) in microseconds."""
    fn(*args)
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < batch_s or calls == 0:
            fn(*args)
            calls += 1
        best = min(best, elapsed / calls)
    return best * 1e6


def products(rows_list, ranks=(4, 8, 12, 16)) -> None:
    ext = thin_native._ext
    print("| rows | in x out | rank | x A torch / native | h B + bias addmm / native | dy B^T torch / native |")
    print("|---|---|---|---|---|---|")
    for rows in rows_list:
        for n_in, n_out in LAYERS:
            for rank in ranks:
                x, a = torch.randn(rows, n_in), torch.randn(n_in, rank)
                h, b, bias = torch.randn(rows, rank), torch.randn(rank, n_out), torch.randn(n_out)
                dy = torch.randn(rows, n_out)
                cells = [
                    (best_us(torch.matmul, x, a), best_us(ext.thin_project, x, a)),
                    (best_us(torch.addmm, bias, h, b), best_us(ext.thin_expand, h, b, bias)),
                    (best_us(torch.matmul, dy, b.t()), best_us(ext.thin_project, dy, b.t())),
                ]
                text = " | ".join(f"{t:.0f} / {n:.0f}" for t, n in cells)
                print(f"| {rows} | {n_in}x{n_out} | {rank} | {text} |", flush=True)


def _forward(layer, x):
    with torch.no_grad():
        layer(x)


def _train_step(layer, x, gy):
    layer(x).backward(gy)


def layers(rows_list, ratios=(16, 64)) -> None:
    print("| in x out | ratio | rank | rows | forward us off -> on | fwd+bwd us off -> on |")
    print("|---|---|---|---|---|---|")
    for n_in, n_out in LAYERS:
        for ratio in ratios:
            layer = MPOLinear.from_linear(nn.Linear(n_in, n_out), ratio=ratio)
            g1 = layer.cores[0]
            rank = g1.shape[-1] if g1.shape[2] == 1 and len(layer.cores) == 2 else "-"
            for rows in rows_list:
                x = torch.randn(rows, n_in)
                xg = x.clone().requires_grad_()
                gy = torch.randn(rows, n_out)

                best = {}
                for _ in range(2):
                    for enabled in (False, True):
                        thin_native.enabled = enabled
                        for name, fn, args in (("f", _forward, (layer, x)), ("b", _train_step, (layer, xg, gy))):
                            t = best_us(fn, *args)
                            best[name, enabled] = min(best.get((name, enabled), t), t)
                thin_native.enabled = thin_native._HAS_THIN
                f0, f1, b0, b1 = best["f", False], best["f", True], best["b", False], best["b", True]
                print(
                    f"| {n_in}x{n_out} | {ratio} | {rank} | {rows} | {f0:.0f} -> {f1:.0f} ({f0 / f1:.2f}x) | "
                    f"{b0:.0f} -> {b1:.0f} ({b0 / b1:.2f}x) |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the grid)")
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 1024], help="row counts (default 64 1024)")
    parser.add_argument("--skip-products", action="store_true", help="only the MPOLinear A/B")
    args = parser.parse_args()
    if not thin_native._HAS_THIN:
        raise SystemExit("the native extension is not built (tnkernels._native lacks thin_project): reinstall it")
    torch.set_num_threads(args.threads)
    print(f"# thin GEMM A/B, {time.strftime('%Y-%m-%d %H:%M')}, {args.threads} thread(s)\n")
    if not args.skip_products:
        products(args.rows)
        print()
    layers(args.rows)


if __name__ == "__main__":
    main()

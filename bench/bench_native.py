"""CPU latency of the native MPO kernel vs the torch path vs dense F.linear, on the grid shapes.

    python bench/bench_native.py                       # full grid -> bench/results/native_<date>.json
    python bench/bench_native.py --quick               # one shape, for a smoke run
    python bench/bench_native.py --shapes gpt2xl_fc --rows 1 16 --ratios 4 16

Every cell times the providers in interleaved rounds (native, native_bf16, torch, dense, native, ...) so that drift
on a shared machine hits them alike; it stores the median and the min per-call latency and prints and compares the
min (the least disturbed estimate when other jobs share the cores). Cores are random with the
shapes an MPO of the given ratio has (latency does not depend on the values): balanced modes, a uniform bond chosen
as the largest that keeps params <= dense/ratio (bonds also capped by the TT-rank bound).

With --threads 1 the speed-ups compare CPU time per call (time.thread_time: every provider then runs on the
calling thread), because on a shared machine wall time mostly measures how long the thread sat descheduled; wall
times are stored too. The "cost" columns are the criterion of issue 6: MPO (bytes + FLOPs) / dense (bytes +
FLOPs) at that row count, bytes = fp32 bytes of the cores the kernel sweeps (the merged ones when its schedule
merges) + input + output, FLOPs = native_impl.native_cost (the sweep of the chosen schedule, plus merges it pays
per call). "flops_vs_torch" is the torch plan's FLOPs over native's: where it is near 1 both paths run the same
GEMMs and the speed-up is bound by GEMM throughput, not by overheads. The load average is recorded before and
after every cell.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill._atomic import atomic_write_text  # noqa: E402
from tnkernels.ops import mpo_linear  # noqa: E402
from tnkernels.ops.mpo import native_impl  # noqa: E402
from tnkernels.plan.calibrate import cpu_model  # noqa: E402

SHAPES = {  # name: (in_features, out_features)
    "gpt2xl_fc": (1600, 6400),
    "gpt2xl_proj": (6400, 1600),
    "gpt2xl_attn": (1600, 4800),
    "gpt2s_fc": (768, 3072),
    "minilm_fc": (384, 1536),
    "minilm_proj": (1536, 384),
    "resnet_fc": (512, 1000),
}
ROWS = (1, 4, 16, 64)
PROVIDERS = ("native", "native_bf16", "torch", "dense")
RATIOS = (2, 4, 16, 64)


def balanced_modes(n: int, k: int) -> list[int]:
    """Split n into k integer factors as evenly as possible (greedy on prime factors), largest in the middle."""
    primes, m, p = [], n, 2
    while m > 1:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    bins = [1] * k
    for q in sorted(primes, reverse=True):
        bins[bins.index(min(bins))] *= q
    bins.sort()
    # small modes at the ends keep the boundary cores small, as MPO layers usually are
    return bins[0::2] + bins[1::2][::-1]


def mpo_shapes(in_f: int, out_f: int, ratio: float, num_cores: int) -> list[tuple[int, int, int, int]]:
    im, om = balanced_modes(in_f, num_cores), balanced_modes(out_f, num_cores)
    dims = [i * j for i, j in zip(im, om)]

    def shapes_for(bond: int) -> list[tuple[int, int, int, int]]:
        rs = [1]
        for k in range(1, num_cores):
            left = 1
            for d in dims[:k]:
                left *= d
            right = 1
            for d in dims[k:]:
                right *= d
            rs.append(min(bond, left, right))
        rs.append(1)
        return [(rs[k], im[k], om[k], rs[k + 1]) for k in range(num_cores)]

    budget = in_f * out_f / ratio
    best = shapes_for(1)
    for bond in range(1, 4096):
        s = shapes_for(bond)
        if sum(a * b * c * d for a, b, c, d in s) > budget or s == best and bond > 1:
            break
        best = s
    return best


def time_rounds(fns: dict, rounds: int, min_time: float) -> dict:
    """Interleaved timing: per round, each fn runs `number` calls; returns median/min seconds per call, both wall
    clock and this thread's CPU time (time.thread_time). With one torch thread every provider runs on the calling
    thread, so CPU time is the latency it would have on an idle core: it does not count the time the thread sat
    descheduled, which on a machine with a load average of 10 on 2 cores is most of the wall time and is random."""
    number = {}
    for name, fn in fns.items():  # warm up and size `number` so one round takes about min_time
        fn()
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < min_time / 4 or n < 3:
            fn()
            n += 1
        per = (time.perf_counter() - t0) / n
        number[name] = max(1, int(min_time / per))
    samples = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(number[name]):
                fn()
            cpu[name].append((time.thread_time() - c0) / number[name])
            samples[name].append((time.perf_counter() - t0) / number[name])
    return {
        name: {"median_s": statistics.median(s), "min_s": min(s), "cpu_min_s": min(cpu[name])}
        for name, s in samples.items()
    }


def torch_plan(shapes, rows: int) -> dict:
    """What the planned torch path runs for this cell (label and its FLOPs), when the planner is present."""
    try:
        from tnkernels.plan.cache import mpo_decision

        dec = mpo_decision(tuple(shapes), rows, torch.float32, torch.device("cpu"), False)
        return {"label": dec.forward.label, "flops": dec.forward.flops}
    except Exception as exc:  # noqa: BLE001  (the planner is another issue's module; report, don't fail)
        return {"label": f"unknown ({type(exc).__name__})", "flops": None}


def bench_cell(
    in_f: int, out_f: int, ratio: float, rows: int, num_cores: int, rounds: int, min_time: float, max_flops: float
) -> dict:
    shapes = mpo_shapes(in_f, out_f, ratio, num_cores)
    # the work native runs: the sweep of its schedule (+ the merges it pays per call, if its pack is not cached)
    flops = native_impl.native_cost([torch.empty(s, device="meta") for s in shapes], rows)
    direction, groups, _, cached = native_impl.choose_schedule(tuple(tuple(s) for s in shapes), rows, 4, True)
    if flops > max_flops:  # e.g. ratio 2 on GPT-2 XL: a sweep of ~1e11 FLOPs takes seconds per call here
        return {
            "in": in_f,
            "out": out_f,
            "ratio_target": ratio,
            "rows": rows,
            "core_shapes": shapes,
            "mpo_flops": flops,
            "skipped": f"native FLOPs {flops:.2e} > --max-flops {max_flops:.0e}",
        }
    cores = [torch.randn(s) * 0.1 for s in shapes]
    cores_bf16 = [g.bfloat16() for g in cores]
    w = torch.randn(out_f, in_f) * 0.02
    bias = torch.randn(out_f)
    x = torch.randn(rows, in_f)
    fns = {
        "native": lambda: mpo_linear(x, cores, bias, backend="native"),
        "native_bf16": lambda: mpo_linear(x, cores_bf16, bias, backend="native"),
        "torch": lambda: mpo_linear(x, cores, bias, backend="torch"),
        "dense": lambda: F.linear(x, w, bias),
    }
    load_before = os.getloadavg()
    with torch.inference_mode():
        res = time_rounds(fns, rounds, min_time)
    load_after = os.getloadavg()
    params = sum(g.numel() for g in cores)
    # elements of the cores the kernel reads per call (a group of one core is that core)
    swept = sum(math.prod(native_impl._merged_shape(shapes[a:b])) for a, b in groups)
    dense_flops = 2 * rows * in_f * out_f
    io_bytes = 4 * rows * (in_f + out_f)
    mpo_cost = 4 * swept + io_bytes + flops
    dense_cost = 4 * in_f * out_f + io_bytes + dense_flops
    # speed-ups use the per-cell minimum of CPU time with one thread (see time_rounds), or of wall time otherwise
    metric = "cpu_min_s" if torch.get_num_threads() == 1 else "min_s"
    nat, tor, den = (res[p][metric] for p in ("native", "torch", "dense"))
    plan = torch_plan(shapes, rows)
    return {
        "in": in_f,
        "out": out_f,
        "ratio_target": ratio,
        "ratio_actual": in_f * out_f / params,
        "core_shapes": shapes,
        "rows": rows,
        "mpo_flops": flops,
        "dense_flops": dense_flops,
        "cost_fraction": mpo_cost / dense_cost,
        "latency": res,
        "speedup_metric": metric,
        "speedup_vs_torch": tor / nat,
        "speedup_vs_dense": den / nat,
        "native_schedule": {"direction": direction, "groups": groups, "cached_pack": cached},
        "native_gflops": flops / nat / 1e9,
        "torch_plan": plan,
        "flops_vs_torch": plan["flops"] / flops if plan["flops"] else None,
        "loadavg_before_after": [load_before[0], load_after[0]],
    }


def environment() -> dict:
    cpu = cpu_model()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "native_available": native_impl.native_available(),
        "pack_budget": native_impl._PACK_BUDGET[0],
        "loadavg_at_end": os.getloadavg(),
        "note": "shared machine: other jobs ran concurrently; compare ratios within a cell, not absolute times",
    }


def summarize(paths: list[Path], out_json: Path, out_md: Path) -> None:
    """Combine repeated runs: per cell and provider the minimum over runs (the least disturbed estimate on a shared
    machine, applied alike to every provider), then medians of the speed-ups per row count, as JSON and markdown."""
    runs = [json.loads(p.read_text()) for p in paths]
    cells: dict[tuple, dict] = {}
    for run in runs:
        for c in run["cells"]:
            if "skipped" in c:
                continue
            key = (c["shape"], c["ratio_target"], c["rows"])
            best = cells.setdefault(key, {**c, "latency": {}, "loads": []})
            best["loads"].extend(c["loadavg_before_after"])
            for prov, lat in c["latency"].items():
                prev = best["latency"].get(prov)
                v = lat[c.get("speedup_metric", "min_s")]
                best["latency"][prov] = v if prev is None else min(prev, v)
    rows_all = sorted({k[2] for k in cells})
    table = []
    for c in cells.values():
        lat = c["latency"]
        c["speedup_vs_torch"] = lat["torch"] / lat["native"]
        c["speedup_vs_dense"] = lat["dense"] / lat["native"]
        c["bf16_vs_fp32_cores"] = lat["native"] / lat["native_bf16"]
    summary = {}
    for rows in rows_all:
        sel = [c for c in cells.values() if c["rows"] == rows]
        qual = [c for c in sel if c["cost_fraction"] < 0.5]
        summary[rows] = {
            "cells": len(sel),
            "median_x_torch": statistics.median(c["speedup_vs_torch"] for c in sel),
            "cells_x_torch_ge_2": sum(c["speedup_vs_torch"] >= 2 for c in sel),
            "median_x_dense": statistics.median(c["speedup_vs_dense"] for c in sel),
            "cost_under_half_cells": len(qual),
            "cost_under_half_faster_than_dense": sum(c["speedup_vs_dense"] > 1 for c in qual),
            "median_torch_flops_over_native": statistics.median(c["flops_vs_torch"] or float("nan") for c in sel),
            "median_bf16_vs_fp32_cores": statistics.median(c["bf16_vs_fp32_cores"] for c in sel),
        }
    loads = [x for c in cells.values() for x in c["loads"]]
    first = next(c for c in runs[0]["cells"] if "skipped" not in c)
    metric_name = "CPU time of the calling thread" if first.get("speedup_metric") == "cpu_min_s" else "wall time"
    env = {"runs": [str(p) for p in paths], "environments": [r["environment"] for r in runs],
           "loadavg_min_median_max": [min(loads), statistics.median(loads), max(loads)]}  # fmt: skip
    out_json.write_text(json.dumps({"environment": env, "summary": summary, "cells": list(cells.values())}, indent=1))
    lines = [
        f"# Native MPO kernel vs torch planned path vs dense ({len(runs)} runs, per-cell minimum over runs)",
        "",
        f"Load average during the runs (1-min, min / median / max): {env['loadavg_min_median_max'][0]:.1f} / "
        f"{env['loadavg_min_median_max'][1]:.1f} / {env['loadavg_min_median_max'][2]:.1f} on "
        f"{runs[0]['environment']['logical_cpus']} logical CPUs; torch threads "
        f"{runs[0]['environment']['torch_threads']}. Times are per-call {metric_name} "
        "(minimum over rounds and runs). Command: `python bench/bench_native.py --threads 1 --out RUN.json` "
        "per run, then `python bench/bench_native.py --summarize RUN.json ... --out SUMMARY.json`.",
        "",
        "| rows | cells | median x torch | cells >= 2x torch | median x dense | cost < 1/2 dense: faster than dense "
        "| median torch FLOPs / native FLOPs | median bf16-core speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rows, m in summary.items():
        lines.append(
            f"| {rows} | {m['cells']} | {m['median_x_torch']:.2f} | {m['cells_x_torch_ge_2']} | "
            f"{m['median_x_dense']:.2f} | {m['cost_under_half_faster_than_dense']} of {m['cost_under_half_cells']} | "
            f"{m['median_torch_flops_over_native']:.2f} | {m['median_bf16_vs_fp32_cores']:.2f} |"
        )
    lines += ["", "| shape | ratio | rows | cost | native us | torch us | dense us | x torch | x dense | "
              "torch/native FLOPs | schedule |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (shape, ratio, rows), c in sorted(cells.items()):
        lat, sch = c["latency"], c["native_schedule"]
        table.append(
            f"| {shape} | {ratio:g} | {rows} | {c['cost_fraction']:.2f} | {lat['native'] * 1e6:.0f} | "
            f"{lat['torch'] * 1e6:.0f} | {lat['dense'] * 1e6:.0f} | {c['speedup_vs_torch']:.2f} | "
            f"{c['speedup_vs_dense']:.2f} | {c['flops_vs_torch'] or float('nan'):.2f} | {sch['direction']} "
            f"{[tuple(g) for g in sch['groups']]}{' cached' if sch['cached_pack'] else ''} |"
        )
    out_md.write_text("\n".join(lines + table) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="*", type=int, default=list(ROWS))
    ap.add_argument("--ratios", nargs="*", type=float, default=list(RATIOS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--min-time", type=float, default=0.01, help="seconds per provider per round")
    ap.add_argument("--max-flops", type=float, default=4e9, help="skip cells whose native work needs more FLOPs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument(
        "--pack-budget", type=float, default=None, help="native_impl.set_pack_budget (default: the library default)"
    )
    ap.add_argument("--quick", action="store_true", help="one shape, rows 1 and 16, ratios 4 and 16")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/native_<date>.json)")
    ap.add_argument("--summarize", nargs="+", type=Path, default=None, help="combine these run JSONs into --out "
                    "(JSON) and the same path with .md; runs nothing")  # fmt: skip
    args = ap.parse_args(argv)
    if args.summarize:
        out = args.out or Path(__file__).parent / "results" / "native_summary.json"
        summarize(args.summarize, out, out.with_suffix(".md"))
        print(out.with_suffix(".md").read_text())
        return 0
    if not native_impl.native_available():
        print(f"native extension not built: {native_impl.is_available()[1]}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pack_budget is not None:
        native_impl.set_pack_budget(args.pack_budget)
    if args.quick:
        args.shapes, args.rows, args.ratios = ["gpt2s_fc"], [1, 16], [4.0, 16.0]
    cells = []
    cols = ("native", "nat_bf16", "torch", "dense")
    hdr = f"{'shape':12} {'ratio':>5} {'rows':>4} {'cost':>5} " + " ".join(f"{c:>9}" for c in cols)
    hdr += f" {'x_torch':>7} {'x_dense':>7} {'fl_t/n':>6} {'load':>5} schedule"
    print(hdr)
    for name in args.shapes:
        in_f, out_f = SHAPES[name]
        num_cores = 4 if min(in_f, out_f) >= 1024 or max(in_f, out_f) >= 4096 else 3
        for ratio in args.ratios:
            for rows in args.rows:
                c = bench_cell(in_f, out_f, ratio, rows, num_cores, args.rounds, args.min_time, args.max_flops)
                c["shape"] = name
                c["threads"] = torch.get_num_threads()
                cells.append(c)
                if "skipped" in c:
                    print(f"{name:12} {ratio:5g} {rows:4d} skipped: {c['skipped']}", flush=True)
                    continue
                lat = c["latency"]
                print(
                    f"{name:12} {ratio:5g} {rows:4d} {c['cost_fraction']:5.2f} "
                    + " ".join(f"{lat[p][c['speedup_metric']] * 1e6:8.1f}u" for p in PROVIDERS)
                    + f" {c['speedup_vs_torch']:7.2f} {c['speedup_vs_dense']:7.2f}"
                    + f" {c['flops_vs_torch'] or float('nan'):6.2f} {c['loadavg_before_after'][1]:5.1f}"
                    + f" {c['native_schedule']['direction']}{list(c['native_schedule']['groups'])}"
                    + ("(cached)" if c["native_schedule"]["cached_pack"] else ""),
                    flush=True,
                )
    out = args.out or Path(__file__).parent / "results" / f"native_{_dt.date.today().isoformat()}.json"
    atomic_write_text(out, json.dumps({"environment": environment(), "cells": cells}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does the planner pick the fastest plan? Force every plan kind, time it, and compare with the pick.

    python -m bench.plan_check                       # the CPU grid (about 5 minutes on 2 quiet cores)
    python -m bench.plan_check --quick               # 2 shapes, a few seconds
    python -m bench.plan_check --out bench/results   # also writes plan_check_<date>.json and .md

For each grid point (layer shape, ratio, rows; forward, no grad) the layer gets the structure the grid uses
(`choose_mpo_structure(..., rows=1024)`, usually the low-rank split) and, with `--structure both` (the default),
also the best balanced-modes structure (`low_rank=False`, 2..5 cores: where merges and rebuilds compete), every
plan kind is forced in turn and timed, and the planner's own
pick is judged against the fastest kind measured in the same run. The kinds are timed in several interleaved
rounds (kind A, B, C, ..., then again) and each keeps its fastest call, so a burst of load from another process
hits one round of every kind rather than all calls of one kind. The predicted time of each kind is printed
beside the measured one: it is the planner's cost model, so the table shows where that model is wrong. Kinds
predicted more than SKIP_FACTOR (50) times slower than the best are listed but not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform

import torch

from bench.ab_common import best_single_call, positive_int, provenance
from bench.providers import forced_kind_predictions, linear_providers
from bench.run_grid import LINEAR_SHAPES
from distill._atomic import atomic_write_text
from tnkernels.plan import MPOStructure, choose_mpo_structure, mpo_decision, options

GRIDS = {
    "cpu": dict(
        linear=["resnet34-fc", "minilm-mlp-down", "minilm-mlp-up", "gpt2-mlp-up"],
        ratios=[2, 4, 16, 64],
        rows=[1, 16, 64, 1024],
    ),
    "quick": dict(linear=["minilm-mlp-down", "resnet34-fc"], ratios=[4, 16], rows=[1, 64]),
    "smoke": dict(linear=["minilm-mlp-down"], ratios=[16], rows=[8]),  # the unit test's plumbing check
}


def check_point(name: str, ratio: float, s: MPOStructure, rows: int, rounds: int, reps: int) -> dict:
    """Time every worthwhile forced plan kind of layer `name` with structure `s` at `rows` rows."""
    n_in, n_out = LINEAR_SHAPES[name]
    module = linear_providers(s.in_modes, s.out_modes, s.bonds, peers=False, backend="torch")[1].module
    x = torch.randn(rows, n_in)
    shapes = s.core_shapes()
    cpu = torch.device("cpu")
    predicted, kinds = forced_kind_predictions(shapes, rows)
    skipped = {k: v for k, v in predicted.items() if k not in kinds}
    measured = {k: float("inf") for k in kinds}
    with torch.no_grad():
        for kind in kinds:  # warm-up: first calls allocate and plan
            with options(force=kind):
                module(x)
        for _ in range(rounds):
            for kind in kinds:
                with options(force=kind):
                    measured[kind] = min(measured[kind], best_single_call(lambda: module(x), reps))
    chosen = mpo_decision(shapes, rows, torch.float32, cpu, False).forward.kind
    fastest = min(measured, key=measured.get)
    return dict(
        layer=name,
        shape=[n_out, n_in],
        ratio=ratio,
        rows=rows,
        structure=dict(in_modes=s.in_modes, out_modes=s.out_modes, bonds=s.bonds, label=s.label),
        predicted_s=predicted,
        measured_s=measured,
        skipped_predicted_s=skipped,
        chosen=chosen,
        fastest=fastest,
        chosen_over_fastest=measured[chosen] / measured[fastest],
        within_10pct=measured[chosen] <= 1.1 * measured[fastest],
    )


def structures(name: str, ratio: float, which: str) -> list[MPOStructure]:
    """The structures to check at this (layer, ratio): from_linear's pick ("auto", usually low rank), the best
    balanced one ("balanced"), or both, once each when the pick is balanced already."""
    n_in, n_out = LINEAR_SHAPES[name]
    picks = []
    for low_rank in {"both": (True, False), "auto": (True,), "balanced": (False,)}[which]:
        s = choose_mpo_structure(n_out, n_in, ratio, rows=1024, low_rank=low_rank)
        if all(s.core_shapes() != p.core_shapes() for p in picks):
            picks.append(s)
    return picks


def _table(records: list[dict]) -> str:
    lines = [
        "| layer | ratio | structure | rows | picked | fastest | picked/fastest "
        "| measured ms (predicted ms) per kind |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        per_kind = ", ".join(
            f"{k} {r['measured_s'][k] * 1e3:.3f} ({r['predicted_s'][k] * 1e3:.3f})" for k in r["measured_s"]
        )
        if r.get("skipped_predicted_s"):
            per_kind += "; not run: " + ", ".join(f"{k} ({v * 1e3:.3g})" for k, v in r["skipped_predicted_s"].items())
        lines.append(
            f"| {r['layer']} {r['shape'][0]}x{r['shape'][1]} | {r['ratio']} | {r['structure']['label']} | "
            f"{r['rows']} | {r['chosen']} | "
            f"{r['fastest']} | {r['chosen_over_fastest']:.2f} | {per_kind} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 shapes, 2 ratios, 2 row counts")
    size.add_argument("--smoke", action="store_true", help="1 point (plumbing check)")
    # at least 1: with 0 every kind "measured" infinity, and inf <= 1.1 * inf judged every pick within 10%
    ap.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds over the kinds (default 5)")
    ap.add_argument("--reps", type=positive_int, default=5, help="calls per kind per round (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared box)")
    ap.add_argument("--out", help="folder for plan_check_<date>.json and .md")
    ap.add_argument(
        "--structure", choices=("both", "auto", "balanced"), default="both",
        help="auto: from_linear's pick (usually low rank); balanced: balanced modes only; both (default)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    grid = GRIDS["smoke" if args.smoke else "quick" if args.quick else "cpu"]
    records = []
    for name in grid["linear"]:
        for ratio in grid["ratios"]:
            for rows in grid["rows"]:
                for s in structures(name, ratio, args.structure):
                    rec = check_point(name, ratio, s, rows, args.rounds, args.reps)
                    records.append(rec)
                    print(
                        f"{name:16s} ratio {ratio:3g} {rec['structure']['label']:8s} rows {rows:5d}: "
                        f"picked {rec['chosen']:12s} "
                        f"fastest {rec['fastest']:12s} x{rec['chosen_over_fastest']:.2f}",
                        flush=True,
                    )
    frac = sum(r["within_10pct"] for r in records) / len(records)
    out = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.machine(),
        processor=platform.processor() or None,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        **provenance(),
        load_avg=os.getloadavg(),
        command="python -m bench.plan_check " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        within_10pct_fraction=frac,
        records=records,
    )
    print(f"\npick within 10% of the fastest measured kind: {frac:.0%} of {len(records)} points")
    print(f"load average {out['load_avg']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"plan_check_{out['date'][:10]}")
        atomic_write_text(stem + ".json", json.dumps(out, indent=1))
        md = (
            f"# Planner pick vs fastest forced kind ({out['date']}, {out['threads']} thread(s), "
            f"load {', '.join(f'{v:.1f}' for v in out['load_avg'])})\n\n"
            f"Pick within 10% of the fastest: **{frac:.0%}** of {len(records)} points. "
            f"Command: `{out['command']}`\n\n" + _table(records) + "\n"
        )
        atomic_write_text(stem + ".md", md)
    return out


if __name__ == "__main__":
    main()

"""Run the benchmark grid: tnkernels vs dense, naive einsum, tltorch and torch-mpo (same modes and bonds).

    python -m bench.run_grid --quick              # CI smoke-sized grid (well under a minute on 2 CPU cores)
    python -m bench.run_grid                      # the CPU subset (see PRESETS["cpu"]; "cpu-all": every shape)
    python -m bench.run_grid --preset full        # the whole grid of issue 7 (a quiet machine or a GPU)
    python -m bench.run_grid --out bench/results  # where grid-<preset>.json and grid-<preset>.md go

Every grid point records the fastest call of each provider over 3 rounds that visit the providers in turn
(interleaved, so a drift of the machine's speed hits all of them alike), ratios against dense and each peer, the
plan the planner picked with its predicted time, and the roofline-predicted speed-up over dense beside the
measured one (roofline = max(FLOPs / peak, bytes / bandwidth) with the calibrated peak and bandwidth).
With --check-plans, each plan kind is also forced and timed, to see whether the pick is within 10% of the
fastest measured candidate. Timings on a machine shared with other jobs are noisy: ratios are measured side by
side in one run, and the JSON says which machine and load it ran on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys

import torch
from torch import nn

from bench.ab_common import provenance
from bench.providers import conv_providers, forced_kind_predictions, linear_providers, saved_bytes, timer
from distill._atomic import atomic_write_text
from tnkernels.ops.tucker.ranks import choose_tucker_ranks
from tnkernels.ops.tucker.tuned import kind_for as tucker_kind_for
from tnkernels.plan import (
    auto_mpo_backend,
    choose_mpo_structure,
    get_calibration,
    mpo_decision,
    options,
    tucker_decision,
)
from tnkernels.plan.calibrate import cpu_model
from tnkernels.plan.cost import roofline_seconds
from tnkernels.plan.mpo import sweep_backward_steps

LINEAR_SHAPES = {  # name: (in_features, out_features)
    "gpt2xl-mlp-up": (1600, 6400),
    "gpt2xl-mlp-down": (6400, 1600),
    "gpt2xl-attn-qkv": (1600, 4800),
    "gpt2-mlp-up": (768, 3072),
    "minilm-mlp-up": (384, 1536),
    "minilm-mlp-down": (1536, 384),
    "resnet34-fc": (512, 1000),
}
CONV_SHAPES = {  # name: (channels, spatial size at that stage of ResNet-34)
    "resnet34-conv64": (64, 56),
    "resnet34-conv128": (128, 28),
    "resnet34-conv256": (256, 14),
    "resnet34-conv512": (512, 7),
}
PRESETS = {
    "full": dict(linear=list(LINEAR_SHAPES), rows=[1, 64, 1024, 4096], ratios=[2, 4, 16, 64],
                 conv=list(CONV_SHAPES), batches=[1, 8, 32], reps=20),
    # Every shape of the issue at up to 1024 rows (4096 rows of GPT-2 XL take seconds a call on one CPU core):
    # about 30-40 minutes on one thread of the 2-core VMs.
    "cpu-all": dict(linear=list(LINEAR_SHAPES), rows=[1, 64, 1024], ratios=[2, 4, 16, 64],
                    conv=list(CONV_SHAPES), batches=[1, 8], reps=5),
    # The subset the sessions re-run after each change: 4 of the 7 linear shapes (no GPT-2 XL), 2 of the 4 conv
    # stages, rows up to 1024. About 1.5 minutes on one thread of the 2-core EPYC VM (2026-12-02).
    "cpu": dict(linear=["resnet34-fc", "minilm-mlp-down", "minilm-mlp-up", "gpt2-mlp-up"],
                rows=[1, 64, 1024], ratios=[2, 4, 16, 64], conv=["resnet34-conv64", "resnet34-conv256"],
                batches=[1, 8], reps=7),
    "quick": dict(linear=["minilm-mlp-down", "resnet34-fc"], rows=[1, 64], ratios=[4, 16],
                  conv=["resnet34-conv256"], batches=[1], reps=5),
    "smoke": dict(linear=["minilm-mlp-down"], rows=[8], ratios=[4], conv=["resnet34-conv512"], batches=[1],
                  reps=2),
}  # fmt: skip


def _tnk_flops_bytes(dec, shapes, rows: int, cal, passes: str) -> tuple[float, float]:
    f, b = dec.forward.flops, dec.forward.bytes
    if passes == "fwd+bwd" and dec.backward is not None:
        bw = sweep_backward_steps(cal, shapes, dec.backward.groups, dec.backward.direction, rows, 4)
        f += sum(s.flops for s in bw)
        b += sum(s.bytes for s in bw)
    return f, b


def _run_pass(module, x, passes: str):
    if passes == "fwd":

        def forward():
            with torch.no_grad():  # inside the call: a no_grad around building the lambda would not apply
                return module(x)

        return forward

    params = [p for p in module.parameters()]
    xg = x.detach().requires_grad_(True)
    # A dense upstream gradient, made once: what a layer gets inside a network. `.sum().backward()` would add a
    # reduction over the output to every provider's time and hand the layer a stride-0 gradient, which some
    # implementations must first copy out (2.2 ms of a 9 ms step for a 1024 x 3072 output).
    with torch.no_grad():
        gy = torch.randn_like(module(x))

    def step():
        for p in params:
            p.grad = None
        xg.grad = None
        module(xg).backward(gy)

    return step


ROUNDS = 3


def _interleaved(providers, x, passes: str, reps: int, extra: dict | None = None) -> tuple[dict, dict]:
    """Fastest call of every available provider over ROUNDS rounds that visit the providers in turn.

    On a shared VM the speed of the machine drifts by tens of percent over seconds (the same cell measured in two
    idle runs differed by up to 1.6x, for dense too); interleaving puts every provider under the same drift, so
    the ratios hold even when the absolute times do not. `extra`: name -> (module, its own input), timed in the
    same rounds (the framework floor)."""
    skipped = {p.name: p.why for p in providers if p.module is None}
    live = [p for p in providers if p.module is not None]
    fns = {p.name: _run_pass(p.module, x, passes) for p in live}
    for name, (module, own_x) in (extra or {}).items():
        fns[name] = _run_pass(module, own_x, passes)
    times = {name: float("inf") for name in fns}
    per_round = max(2, -(-reps // ROUNDS))
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            times[name] = min(times[name], timer(fn, reps=per_round, warmup=1))
    return times, skipped


# Below 64 rows a layer's math takes microseconds, less than what PyTorch spends dispatching any module call.
# The grid times that floor in the same rounds: the same pass through nn.Linear(8, 8) at the same row count
# (one GEMM of 64 numbers: nothing but the framework's per-call cost), so "measured / (roofline + floor)" says how
# far tnkernels is from the best order's roofline plus the cost every PyTorch layer pays.
FLOOR_FEATURES = 8


def _floor_probe(rows: int) -> dict:
    return {"floor": (nn.Linear(FLOOR_FEATURES, FLOOR_FEATURES), torch.randn(rows, FLOOR_FEATURES))}


def bench_linear(
    name: str, rows: int, ratio: float, passes: str, reps: int, check_plans: bool, peers: bool,
    low_rank: bool = True,
):  # fmt: skip
    n_in, n_out = LINEAR_SHAPES[name]
    # structure fixed per layer, not per row count; low_rank=False restricts it to balanced modes (2..5 cores)
    s = choose_mpo_structure(n_out, n_in, ratio, rows=1024, low_rank=low_rank)
    providers = linear_providers(s.in_modes, s.out_modes, s.bonds, peers=peers)
    x = torch.randn(rows, n_in)
    times, skipped = _interleaved(providers, x, passes, reps, _floor_probe(rows) if rows < 64 else None)
    if passes == "fwd":  # the opt-in inference mode: keeps the rebuilt weight when the chain costs more
        with options(cache_dense=True):
            times["tnkernels+cache_dense"] = timer(_run_pass(providers[1].module, x, passes), reps=reps)
    cal = get_calibration("cpu", torch.float32)
    shapes = s.core_shapes()
    dec = mpo_decision(shapes, rows, torch.float32, torch.device("cpu"), passes == "fwd+bwd")
    flops, nbytes = _tnk_flops_bytes(dec, shapes, rows, cal, passes)
    mult = 3 if passes == "fwd+bwd" else 1
    dense_flops = mult * 2 * rows * n_in * n_out
    dense_bytes = mult * 4 * (rows * n_in + n_in * n_out + rows * n_out)
    rec = dict(
        kind="linear", layer=name, shape=[n_out, n_in], ratio=ratio, achieved_ratio=round(s.ratio, 3),
        rows=rows,
        passes=passes, structure=dict(in_modes=s.in_modes, out_modes=s.out_modes, bonds=s.bonds, label=s.label),
        backend=auto_mpo_backend("cpu", rows, torch.float32, passes == "fwd+bwd", s.is_low_rank),
        plan=dec.forward.label, backward_plan=dec.backward.label if dec.backward else None,
        predicted_s=dec.fwd_seconds + dec.bwd_seconds, times_s=times, skipped=skipped,
        roofline_speedup=roofline_seconds(cal, dense_flops, dense_bytes) / roofline_seconds(cal, flops, nbytes),
        roofline_tnk_s=roofline_seconds(cal, flops, nbytes),
    )  # fmt: skip
    if check_plans and passes == "fwd":  # the torch backend: the one whose plans can be forced
        torch_module = linear_providers(s.in_modes, s.out_modes, s.bonds, peers=False, backend="torch")[1].module
        rec["plan_check"] = _check_plans(torch_module, x, shapes, rows, reps)
    return rec


def _check_plans(module, x, shapes, rows: int, reps: int) -> dict:
    """Force each plan kind (its best plan), time it, and compare with the kind the planner picks.

    The pick is judged by its own entry in the same measurement set (timed back to back with the others), not by
    a separate timing: on a noisy machine a separate run would compare two different load conditions."""
    _, kinds = forced_kind_predictions(shapes, rows)
    measured = {}
    for kind in kinds:
        with options(force=kind), torch.no_grad():
            measured[kind] = timer(lambda: module(x), reps=reps)
    chosen = mpo_decision(shapes, rows, torch.float32, torch.device("cpu"), False).forward.kind
    best = min(measured.values())
    return dict(measured_by_kind=measured, chosen=chosen, chosen_s=measured[chosen], fastest_s=best,
                within_10pct=measured[chosen] <= 1.1 * best)  # fmt: skip


def bench_conv(name: str, batch: int, ratio: float, passes: str, reps: int, peers: bool, prefer: str = "accuracy"):
    c, hw = CONV_SHAPES[name]
    conv = ((1, 1), (1, 1), (1, 1))
    # the ranks TuckerConv2d.from_conv(ratio=..., prefer=prefer) gives a (random) kernel of this shape on this
    # machine; the peers get the same ones
    kernel = torch.randn(c, c, 3, 3, generator=torch.Generator().manual_seed(0))
    r_out, r_in = choose_tucker_ranks(kernel, ratio, conv, prefer)
    providers = conv_providers(c, c, 3, (r_out, r_in), 1, peers=peers)
    x = torch.randn(batch, c, hw, hw)
    times, skipped = _interleaved(providers, x, passes, reps)
    shapes = ((batch, c, hw, hw), (c, r_in), (r_out, r_in, 3, 3), (c, r_out))
    dec = tucker_decision(shapes, conv, torch.float32, torch.device("cpu"), passes == "fwd+bwd")
    ran = tucker_kind_for(shapes, conv, torch.float32, torch.device("cpu"), passes == "fwd+bwd")  # measured on CPU
    cal = get_calibration("cpu", torch.float32)
    mult = 3 if passes == "fwd+bwd" else 1
    dense_flops = mult * 2 * batch * hw * hw * c * c * 9
    dense_bytes = mult * 4 * (2 * batch * c * hw * hw + c * c * 9)
    tnk_rl = roofline_seconds(cal, mult * dec.flops, mult * dec.bytes)
    return dict(
        kind="conv", layer=name, shape=[c, c, 3, 3], ratio=ratio, ranks=[r_out, r_in], rows=batch, passes=passes,
        spatial=hw, plan=ran, model_plan=dec.kind, predicted_s=dec.fwd_seconds + dec.bwd_seconds, times_s=times,
        skipped=skipped,
        roofline_speedup=roofline_seconds(cal, dense_flops, dense_bytes) / tnk_rl, roofline_tnk_s=tnk_rl,
    )  # fmt: skip


def recompute_memory(rows: int = 1024) -> dict:
    """Bytes autograd keeps for backward with and without recompute, on a 4-core MiniLM-sized chain."""
    from tnkernels.nn import MPOLinear

    layer = MPOLinear(1536, 384, in_modes=(8, 4, 6, 8), out_modes=(4, 4, 4, 6), bonds=(16, 16, 16), backend="torch")
    x = torch.randn(rows, 1536, requires_grad=True)
    out = {}
    for rec in (False, True):
        with options(recompute=rec, force="sweep-left"):
            out["recompute" if rec else "save"] = saved_bytes(lambda: layer(x))
    return out


def plan_lookup_us(n: int = 20000) -> float:
    """Seconds per cached plan lookup (a dict hit), in microseconds."""
    import time

    shapes = ((1, 40, 80, 16), (16, 40, 80, 1))
    dev = torch.device("cpu")
    mpo_decision(shapes, 64, torch.float32, dev, False)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            mpo_decision(shapes, 64, torch.float32, dev, False)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def environment() -> dict:
    cpu = cpu_model()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("tltorch", "tensorly", "torch_mpo", "opt_einsum", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed, or no __version__
            versions[mod] = None
    cal = get_calibration("cpu", torch.float32)
    prov = provenance()
    versions["tnkernels"] = prov.pop("tnkernels")
    return dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), cpu=cpu, **prov,
        threads=torch.get_num_threads(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        load_avg=os.getloadavg(), versions=versions,
        calibration=dict(overhead_s=cal.overhead_s, bandwidth=cal.bandwidth, rates=cal.rates),
    )  # fmt: skip


def over_floor(r: dict) -> float:
    """Measured time over (roofline of the best order + the framework floor timed in the same rounds)."""
    return r["times_s"]["tnkernels"] / (r["roofline_tnk_s"] + r["times_s"]["floor"])


def summarize(records: list[dict]) -> dict:
    lin = [r for r in records if "tnkernels" in r["times_s"]]
    out: dict = {}

    def ratio(r, peer):
        return r["times_s"][peer] / r["times_s"]["tnkernels"] if peer in r["times_s"] else None

    big = [r["times_s"]["tnkernels"] / r["times_s"]["dense"] for r in lin if r["rows"] >= 64]
    out["max_tnk_over_dense_rows_ge_64"] = max(big) if big else None
    for kind in ("linear", "conv"):
        for ps in ("fwd", "fwd+bwd"):
            cells = [
                r
                for r in lin
                if r["kind"] == kind and r["passes"] == ps and r["rows"] >= (64 if kind == "linear" else 1)
            ]
            if cells:
                ok = sum(r["times_s"]["tnkernels"] <= 1.1 * r["times_s"]["dense"] for r in cells)
                out[f"{kind}_{ps}_within_1.1x_dense"] = f"{ok}/{len(cells)}"
    for peer in ("tltorch", "torch-mpo", "naive-einsum"):
        v = [x for x in (ratio(r, peer) for r in lin) if x is not None]
        if v:
            out[f"median_speedup_vs_{peer}"] = statistics.median(v)
            out[f"min_speedup_vs_{peer}"] = min(v)
            out[f"slower_than_{peer}"] = f"{sum(x < 1 for x in v)}/{len(v)}"
    hits = [r for r in lin if r.get("roofline_speedup", 0) >= 1.5]
    if hits:
        out["fraction_of_roofline_speedup_where_predicted_ge_1.5"] = statistics.median(
            (r["times_s"]["dense"] / r["times_s"]["tnkernels"]) / r["roofline_speedup"] for r in hits
        )
    small = [r for r in lin if r["rows"] < 64 and r["kind"] == "linear"]
    if small:
        pure = [r["times_s"]["tnkernels"] / r["roofline_tnk_s"] for r in small]
        out["median_measured_over_roofline_rows_lt_64"] = statistics.median(pure)
        out["max_measured_over_roofline_rows_lt_64"] = max(pure)
        out["rows_lt_64_within_1.3x_roofline"] = f"{sum(v <= 1.3 for v in pure)}/{len(pure)}"
        floored = [over_floor(r) for r in small if "floor" in r["times_s"]]
        if floored:
            out["median_measured_over_roofline_plus_floor_rows_lt_64"] = statistics.median(floored)
            out["max_measured_over_roofline_plus_floor_rows_lt_64"] = max(floored)
            out["rows_lt_64_within_1.3x_roofline_plus_floor"] = f"{sum(v <= 1.3 for v in floored)}/{len(floored)}"
    checks = [r["plan_check"] for r in records if "plan_check" in r]
    if checks:
        out["plan_within_10pct_fraction"] = sum(c["within_10pct"] for c in checks) / len(checks)
    return out


def table(records: list[dict]) -> str:
    head = ("| layer | shape | ratio | structure | rows | pass | plan | dense ms | tnk ms | vs dense | roofline "
            "| vs einsum "
            "| vs tltorch | vs torch-mpo | tnk / (roofline + floor) |")  # fmt: skip
    lines = [head, "|" + "---|" * 15]
    for r in records:
        t = r["times_s"]
        tnk = t["tnkernels"]

        def vs(peer, tnk=tnk, t=t):
            return f"{t[peer] / tnk:.2f}x" if peer in t else "-"

        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"| {r['layer']} | {shape} | {r['ratio']} | {r.get('structure', {}).get('label', 'Tucker-2')} | "
            f"{r['rows']} | {r['passes']} | {'native' if r.get('backend') == 'native' else r['plan']} | "
            f"{t['dense'] * 1e3:.3f} | {tnk * 1e3:.3f} | {vs('dense')} | {r['roofline_speedup']:.2f}x | "
            f"{vs('naive-einsum')} | {vs('tltorch')} | {vs('torch-mpo')} | "
            f"{f'{over_floor(r):.2f}' if 'floor' in t else '-'} |"
        )
    return "\n".join(lines)


def _cell_key(r: dict) -> tuple:
    return (r["kind"], r["layer"], r["ratio"], r["rows"], r["passes"])


def _resume(partial: str, preset: str, fresh: bool, settings: dict) -> list[dict]:
    """The cells an interrupted run of the same preset and settings finished, so a rerun does not time them again.

    A partial file made with other settings (threads, peers, passes, plan checks) is not resumed: its cells would
    be mixed into a result that records only this run's settings."""
    if fresh or not os.path.exists(partial):
        return []
    with open(partial) as f:
        saved = json.load(f)
    if saved.get("preset") != preset:
        return []
    if saved.get("settings") != settings:
        print(f"not resuming {partial}: made with {saved.get('settings')}, this run has {settings}", flush=True)
        return []
    print(f"resuming: {len(saved['records'])} cells from {partial} (--fresh to start over)", flush=True)
    return saved["records"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--out", default="bench/results", help="output folder for grid-<preset>.json / .md")
    ap.add_argument("--passes", default="fwd,fwd+bwd", help="comma-separated: fwd (no grad), fwd+bwd (training)")
    ap.add_argument("--check-plans", action="store_true", help="force and time every plan kind (forward)")
    ap.add_argument("--no-peers", action="store_true", help="skip tltorch and torch-mpo")
    ap.add_argument(
        "--structure", choices=("auto", "balanced"), default="auto",
        help="auto: the structure MPOLinear.from_linear(ratio=R) picks (usually the low-rank split); balanced: "
        "only balanced modes (2..5 cores), written as grid-<preset>-balanced.*",
    )  # fmt: skip
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); 1 tames a shared machine"
    )
    ap.add_argument(
        "--tucker-prefer", choices=("accuracy", "speed"), default="accuracy",
        help="Tucker ranks as TuckerConv2d.from_conv(prefer=...) picks them: accuracy (the default ranks) or speed "
        "(the rank pair timed fastest on this CPU); output files get a -tucker-speed suffix",
    )  # fmt: skip
    ap.add_argument(
        "--fresh", action="store_true",
        help="ignore the cells an interrupted run left in grid-<preset>.partial.json (default: resume from them)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    # refused before anything is timed: a typo in --passes used to time a training step under a forward label
    passes = list(dict.fromkeys(p.strip() for p in args.passes.split(",")))
    if not passes or any(p not in ("fwd", "fwd+bwd") for p in passes):
        ap.error(f"--passes: comma-separated fwd and/or fwd+bwd, got {args.passes!r}")
    if args.quick and args.preset not in (None, "quick"):
        ap.error(f"--quick is --preset quick; it cannot be combined with --preset {args.preset}")
    if args.threads < 0:
        ap.error(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out!r} is a file; give a folder")
    if args.threads:
        torch.set_num_threads(args.threads)  # the calibration is keyed by thread count, so it follows
    preset = "quick" if args.quick else args.preset or "cpu"
    cfg = PRESETS[preset]
    name_tag = preset + ("-balanced" if args.structure == "balanced" else "")
    name_tag += "-tucker-speed" if args.tucker_prefer == "speed" else ""
    settings = dict(
        threads=torch.get_num_threads(), peers=not args.no_peers, passes=passes, check_plans=args.check_plans
    )
    partial = os.path.join(args.out, f"grid-{name_tag}.partial.json")
    records = _resume(partial, preset, args.fresh, settings)
    done = {_cell_key(r) for r in records}

    def save_partial() -> None:  # a long run that is interrupted still leaves its points on disk
        state = dict(preset=preset, settings=settings, records=records, summary=summarize(records))
        atomic_write_text(partial, json.dumps(state, default=str))

    for name in cfg["linear"]:
        cap = cfg.get("big_rows_cap", {}).get(name, math.inf)
        for ratio in cfg["ratios"]:
            for rows in cfg["rows"]:
                if rows > cap:
                    continue
                for ps in passes:
                    if ("linear", name, ratio, rows, ps) in done:
                        continue
                    rec = bench_linear(
                        name, rows, ratio, ps, cfg["reps"], args.check_plans, not args.no_peers,
                        low_rank=args.structure == "auto",
                    )  # fmt: skip
                    records.append(rec)
                    save_partial()
                    print(table([rec]).splitlines()[-1], flush=True)
    for name in cfg["conv"]:
        for ratio in cfg["ratios"]:
            for batch in cfg["batches"]:
                for ps in passes:
                    if ("conv", name, ratio, batch, ps) in done:
                        continue
                    rec = bench_conv(name, batch, ratio, ps, cfg["reps"], not args.no_peers, args.tucker_prefer)
                    records.append(rec)
                    save_partial()
                    print(table([rec]).splitlines()[-1], flush=True)
    small = preset in ("quick", "smoke")
    result = dict(
        preset=preset,
        structure=args.structure,
        tucker_prefer=args.tucker_prefer,
        command=" ".join(["python -m bench.run_grid", *(sys.argv[1:] if argv is None else argv)]),
        settings=settings,
        environment=environment(),
        summary=summarize(records),
        recompute_saved_bytes=recompute_memory(64 if small else 1024),
        plan_lookup_us=plan_lookup_us(2000 if small else 20000),
        records=records,
    )
    env = result["environment"]
    md = f"# tnkernels grid ({name_tag}), {env['date']}\n\n" + (
        f"`{result['command']}`: {env['cpu']}, {env['threads']} thread(s), load average "
        f"{', '.join(f'{v:.1f}' for v in env['load_avg'])}; torch {env['versions']['torch']}, tnkernels "
        f"{env['versions']['tnkernels']} at {env['git_commit'] or 'an unknown commit'}"
        f"{' with uncommitted changes' if env['git_dirty'] else ''}.\n\n{table(records)}\n\n```\n"
    )
    md += json.dumps({k: result[k] for k in ("summary", "recompute_saved_bytes", "plan_lookup_us")}, indent=1)
    md += "\n```\n"
    atomic_write_text(os.path.join(args.out, f"grid-{name_tag}.json"), json.dumps(result, indent=1, default=str))
    atomic_write_text(os.path.join(args.out, f"grid-{name_tag}.md"), md)
    os.remove(partial)
    print(json.dumps(result["summary"], indent=1))
    print(f"recompute saved bytes: {result['recompute_saved_bytes']}; plan lookup {result['plan_lookup_us']:.2f} us")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

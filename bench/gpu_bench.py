"""GPU benchmark for the Triton kernels: correctness first, then fused kernel vs torch path vs dense cuBLAS/cuDNN.

One command (on a machine with a CUDA GPU):

    python bench/gpu_bench.py                      # full grid, results in bench/results/
    python bench/gpu_bench.py --out DIR --budget-s 200

Phases
  1. environment (GPU, versions, date) and measured peaks: a large bf16 matmul (TFLOP/s) and a device copy (GB/s);
  2. correctness on the GPU: forward and every gradient vs the float64 reference, fp32 (TF32 off) and bf16;
  3. MPO grid (GPT-2 XL layer shapes x bond x rows, bf16): triton vs torch vs dense F.linear, forward; forward +
     backward on the largest row count;
  4. Tucker grid (ResNet-like 3x3 layers, bf16): triton vs torch vs dense F.conv2d.

Every case is wrapped in try/except and the results are rewritten (atomically) after each case, so a crash or the
time budget (--budget-s, default 200 s; cases after it are skipped and listed) never loses what was measured.
Timing: CUDA-graph replay (triton.testing.do_bench_cudagraph) so Python launch overhead is excluded for every
provider alike; plain do_bench if graph capture fails (the `timer` column says which). Roofline time is
max(FLOPs / peak, minimal bytes / bandwidth) with the measured peaks; minimal bytes = input + output + weights
(the fused ideal: no intermediate leaves the chip).
"""

# ruff: noqa: B023 - each case's lambdas are timed inside the loop iteration that defines them.
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_harness import Recorder, measure_peaks, perf_row, rel_rms, time_ms  # noqa: E402

# "cuda" for the real run; "cpu" only for --smoke-cpu (TRITON_INTERPRET=1, tiny shapes: checks this script's code
# paths on a machine without a GPU, measures nothing meaningful).
DEVICE = "cuda"

# Relative-RMS tolerances for the correctness phase (same values as tests/helpers.py with the triton slack).
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-1, torch.float16: 5e-2}


# ------------------------------------------------------------------------------------------------------------
# MPO helpers


def full_ranks(in_modes, out_modes) -> list[int]:
    """Largest useful bond at each cut: min(prod of (i*j) on the left, prod on the right)."""
    sizes = [i * j for i, j in zip(in_modes, out_modes, strict=True)]
    out = []
    for k in range(1, len(sizes)):
        out.append(min(math.prod(sizes[:k]), math.prod(sizes[k:])))
    return out


def make_cores(in_modes, out_modes, max_bond, dtype):
    bonds = [min(max_bond, r) for r in full_ranks(in_modes, out_modes)]
    ranks = [1, *bonds, 1]
    cores = []
    for k, (i, j) in enumerate(zip(in_modes, out_modes, strict=True)):
        g = torch.randn(ranks[k], i, j, ranks[k + 1], device=DEVICE, dtype=torch.float32)
        cores.append((g / math.sqrt(ranks[k] * i)).to(dtype))
    return cores


def chain_flops(rows: int, cores) -> int:
    """FLOPs of the left-to-right sweep the kernels run: sum over steps of 2 * P * Q * K * N."""
    flops, j_done, rest = 0, 1, math.prod(g.shape[1] for g in cores)
    for g in cores:
        r0, i, j, r1 = g.shape
        rest //= i
        flops += 2 * rows * j_done * rest * (r0 * i) * (j * r1)
        j_done *= j
    return flops


# GPT-2 XL (d = 1600) projections, as Linear(in, out), with their MPO modes.
GPT2_XL = [
    ("attn.c_attn", (4, 4, 10, 10), (6, 8, 10, 10)),  # 1600 -> 4800
    ("attn.c_proj", (4, 4, 10, 10), (4, 4, 10, 10)),  # 1600 -> 1600
    ("mlp.c_fc", (4, 4, 10, 10), (8, 8, 10, 10)),  # 1600 -> 6400
    ("mlp.c_proj", (8, 8, 10, 10), (4, 4, 10, 10)),  # 6400 -> 1600
    # the low-rank split, modes (in, 1) x (1, out): what MPOLinear.from_linear(ratio=R) picks by default
    ("mlp.c_fc low-rank", (1600, 1), (1, 6400)),
    ("mlp.c_proj low-rank", (6400, 1), (1, 1600)),
]


def check_correctness(rec: Recorder, mpo_cases, tucker_cases, dtypes) -> None:
    from tnkernels.ops import mpo_linear, mpo_linear_reference, tucker_conv2d, tucker_to_dense

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for dtype in dtypes:
        for rows, in_modes, out_modes, bond in mpo_cases:
            case = f"correct mpo {dtype} rows={rows} {in_modes}->{out_modes} bond={bond}"
            try:
                cores = [g.requires_grad_() for g in make_cores(in_modes, out_modes, bond, dtype)]
                x = torch.randn(rows, math.prod(in_modes), device=DEVICE, dtype=dtype, requires_grad=True)
                b = torch.randn(math.prod(out_modes), device=DEVICE, dtype=dtype, requires_grad=True)
                y = mpo_linear(x, cores, b, backend="triton")
                ref = [t.detach().double().requires_grad_() for t in (x, *cores, b)]
                y_ref = mpo_linear_reference(ref[0], ref[1:-1], ref[-1])
                gy = torch.randn_like(y_ref)
                y.backward(gy.to(dtype))
                y_ref.backward(gy)
                errs = {"y": rel_rms(y, y_ref)}
                for name, t, r in zip(
                    ["x", *[f"g{k}" for k in range(len(cores))], "b"], (x, *cores, b), ref, strict=True
                ):
                    errs[name] = rel_rms(t.grad, r.grad)
                worst = max(errs.values())
                ok = worst <= TOL[dtype]
                rec.add({"phase": "correctness", "op": "mpo", "case": case, "dtype": str(dtype),
                         "max_rel_rms": worst, "ok": ok, "errors": json.dumps(errs)})  # fmt: skip
                print(f"  {case}: max rel RMS {worst:.2e} {'ok' if ok else 'FAIL'}", flush=True)
            except Exception as exc:  # noqa: BLE001 - keep going, the error is recorded
                rec.error(case, exc)
        for n, c, hw, r, k, s, p in tucker_cases:
            case = f"correct tucker {dtype} N={n} C={c} HW={hw} R={r} k={k} s={s} p={p}"
            try:
                x = torch.randn(n, c, hw, hw, device=DEVICE, dtype=dtype, requires_grad=True)
                u_in = (torch.randn(c, r, device=DEVICE) / c**0.5).to(dtype).requires_grad_()
                core = (torch.randn(r, r, k, k, device=DEVICE) / (r * k * k) ** 0.5).to(dtype).requires_grad_()
                u_out = (torch.randn(c + 3, r, device=DEVICE) / r**0.5).to(dtype).requires_grad_()
                b = torch.randn(c + 3, device=DEVICE, dtype=dtype, requires_grad=True)
                y = tucker_conv2d(x, u_in, core, u_out, b, stride=s, padding=p, backend="triton")
                ref = [t.detach().double().requires_grad_() for t in (x, u_in, core, u_out, b)]
                y_ref = F.conv2d(ref[0], tucker_to_dense(ref[3], ref[2], ref[1]), ref[4], s, p)
                gy = torch.randn_like(y_ref)
                y.backward(gy.to(dtype))
                y_ref.backward(gy)
                errs = {"y": rel_rms(y, y_ref)}
                for name, t, rr in zip(
                    ["x", "u_in", "core", "u_out", "b"], (x, u_in, core, u_out, b), ref, strict=True
                ):
                    errs[name] = rel_rms(t.grad, rr.grad)
                worst = max(errs.values())
                ok = worst <= TOL[dtype]
                rec.add({"phase": "correctness", "op": "tucker", "case": case, "dtype": str(dtype),
                         "max_rel_rms": worst, "ok": ok, "errors": json.dumps(errs)})  # fmt: skip
                print(f"  {case}: max rel RMS {worst:.2e} {'ok' if ok else 'FAIL'}", flush=True)
            except Exception as exc:  # noqa: BLE001
                rec.error(case, exc)
    torch.backends.cuda.matmul.allow_tf32 = False  # keep fp32 IEEE; the timed grid is bf16 anyway


def bench_mpo(rec: Recorder, peaks: dict, deadline: float, rows_list, bonds, layers) -> None:
    from tnkernels.ops import mpo_linear, mpo_to_dense

    dtype = torch.bfloat16
    esize = 2
    for name, in_modes, out_modes in layers:
        for bond in bonds:
            cores = make_cores(in_modes, out_modes, bond, dtype)
            n_in, n_out = math.prod(in_modes), math.prod(out_modes)
            params = sum(g.numel() for g in cores)
            ratio = n_in * n_out / params
            w = mpo_to_dense(cores).contiguous()
            bias = torch.randn(n_out, device=DEVICE, dtype=dtype)
            for rows in rows_list:
                case = f"{name} {n_in}->{n_out} bond={bond} rows={rows}"
                if time.time() > deadline:
                    rec.skipped.append(case)
                    continue
                print(f"  {case} (ratio {ratio:.1f})", flush=True)
                x = torch.randn(rows, n_in, device=DEVICE, dtype=dtype)
                flops = chain_flops(rows, cores)
                min_bytes = esize * (x.numel() + rows * n_out + params + n_out)
                dense_flops = 2 * rows * n_in * n_out
                dense_bytes = esize * (x.numel() + rows * n_out + w.numel() + n_out)
                times = {}
                for provider, fn, fl, by in [
                    ("triton", lambda: mpo_linear(x, cores, bias, backend="triton"), flops, min_bytes),
                    ("torch", lambda: mpo_linear(x, cores, bias, backend="torch"), flops, min_bytes),
                    ("dense", lambda: F.linear(x, w, bias), dense_flops, dense_bytes),
                ]:
                    try:
                        ms, timer = time_ms(fn, DEVICE)
                        times[provider] = ms
                        rec.add(perf_row("mpo_fwd", case, provider, ms, timer, fl, by, peaks, rows=rows, bond=bond,
                                         layer=name, param_ratio=ratio))  # fmt: skip
                    except Exception as exc:  # noqa: BLE001
                        rec.error(f"{case} {provider}", exc)
                if {"triton", "torch", "dense"} <= times.keys():
                    s_torch, s_dense = times["torch"] / times["triton"], times["dense"] / times["triton"]
                    print(f"    triton {times['triton'] * 1e3:.1f} us | vs torch {s_torch:.2f}x | vs dense "
                          f"{s_dense:.2f}x (half ratio {ratio / 2:.1f}) | roofline "
                          f"{rec.rows[-3]['pct_roofline']:.0f}%", flush=True)  # fmt: skip
            # Training step on the largest row count: forward + backward (all gradients).
            rows = rows_list[-1]
            case = f"{name} {n_in}->{n_out} bond={bond} rows={rows} fwd+bwd"
            if time.time() > deadline:
                rec.skipped.append(case)
                continue
            x = torch.randn(rows, n_in, device=DEVICE, dtype=dtype, requires_grad=True)
            leaves = [g.detach().clone().requires_grad_() for g in cores]
            wd = w.detach().clone().requires_grad_()
            gy = torch.randn(rows, n_out, device=DEVICE, dtype=dtype)
            chain3 = 3 * chain_flops(rows, cores)
            for provider, fn, fl in [
                ("triton", lambda: mpo_linear(x, leaves, bias, backend="triton").backward(gy), chain3),
                ("torch", lambda: mpo_linear(x, leaves, bias, backend="torch").backward(gy), chain3),
                ("dense", lambda: F.linear(x, wd, bias).backward(gy), 6 * rows * n_in * n_out),
            ]:  # fmt: skip
                try:
                    # autograd + graph capture do not mix reliably; gradients are reset (untimed) between reps
                    ms, timer = time_ms(fn, DEVICE, use_graph=False, grad_to_none=[x, wd, *leaves])
                    rec.add(perf_row("mpo_fwd_bwd", case, provider, ms, timer, fl, 3 * min_bytes, peaks, rows=rows,
                                     bond=bond, layer=name, param_ratio=ratio))  # fmt: skip
                except Exception as exc:  # noqa: BLE001
                    rec.error(f"{case} {provider}", exc)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


# (N, C_in, H, W, C_out, R_in, R_out, k, stride)
TUCKER_GRID = [
    (32, 256, 28, 28, 256, 64, 64, 3, 1),
    (32, 512, 14, 14, 512, 128, 128, 3, 1),
    (8, 128, 56, 56, 128, 32, 32, 3, 1),
    (32, 256, 28, 28, 512, 64, 192, 3, 2),  # R_out above the fused limit: two kernels
]


def bench_tucker(rec: Recorder, peaks: dict, deadline: float, grid) -> None:
    from tnkernels.ops import tucker_conv2d, tucker_to_dense

    dtype = torch.bfloat16
    for n, c_in, h, w_, c_out, r_in, r_out, k, s in grid:
        case = f"N={n} {c_in}->{c_out} {h}x{w_} R=({r_in},{r_out}) k={k} s={s}"
        if time.time() > deadline:
            rec.skipped.append(case)
            continue
        print(f"  {case}", flush=True)
        p = k // 2
        x = torch.randn(n, c_in, h, w_, device=DEVICE, dtype=dtype)
        u_in = torch.randn(c_in, r_in, device=DEVICE, dtype=dtype) / c_in**0.5
        core = torch.randn(r_out, r_in, k, k, device=DEVICE, dtype=dtype) / (r_in * k * k) ** 0.5
        u_out = torch.randn(c_out, r_out, device=DEVICE, dtype=dtype) / r_out**0.5
        bias = torch.randn(c_out, device=DEVICE, dtype=dtype)
        wd = tucker_to_dense(u_out, core, u_in).contiguous()
        oh, ow = (h + 2 * p - k) // s + 1, (w_ + 2 * p - k) // s + 1
        pix_out, pix_in = n * oh * ow, n * h * w_
        flops_t = 2 * (pix_in * c_in * r_in + pix_out * r_in * r_out * k * k + pix_out * r_out * c_out)
        params = u_in.numel() + core.numel() + u_out.numel()
        min_bytes = 2 * (x.numel() + pix_out * c_out + params + c_out)
        flops_d = 2 * pix_out * c_in * c_out * k * k
        bytes_d = 2 * (x.numel() + pix_out * c_out + wd.numel() + c_out)
        ratio = wd.numel() / params
        for provider, fn, fl, by in [
            ("triton", lambda: tucker_conv2d(x, u_in, core, u_out, bias, stride=s, padding=p, backend="triton"),
             flops_t, min_bytes),
            ("torch", lambda: tucker_conv2d(x, u_in, core, u_out, bias, stride=s, padding=p, backend="torch"),
             flops_t, min_bytes),
            ("dense", lambda: F.conv2d(x, wd, bias, s, p), flops_d, bytes_d),
        ]:  # fmt: skip
            try:
                ms, timer = time_ms(fn, DEVICE)
                rec.add(perf_row("tucker_fwd", case, provider, ms, timer, fl, by, peaks, param_ratio=ratio))
                print(
                    f"    {provider}: {ms * 1e3:.1f} us, {rec.rows[-1]['pct_roofline']:.0f}% roofline",
                    flush=True,
                )
            except Exception as exc:  # noqa: BLE001
                rec.error(f"{case} {provider}", exc)
        # Training step: forward + backward, all gradients (x, factors, bias / dense weight, bias).
        if time.time() > deadline:
            rec.skipped.append(case + " fwd+bwd")
            continue
        xg = x.detach().clone().requires_grad_()
        fac = [t.detach().clone().requires_grad_() for t in (u_in, core, u_out, bias)]
        wg = wd.detach().clone().requires_grad_()
        bg = bias.detach().clone().requires_grad_()
        gy = torch.randn(n, c_out, oh, ow, device=DEVICE, dtype=dtype)
        for provider, fn, fl, by, leaves in [
            ("triton", lambda: tucker_conv2d(xg, *fac, stride=s, padding=p, backend="triton").backward(gy),
             3 * flops_t, 3 * min_bytes, [xg, *fac]),
            ("torch", lambda: tucker_conv2d(xg, *fac, stride=s, padding=p, backend="torch").backward(gy),
             3 * flops_t, 3 * min_bytes, [xg, *fac]),
            ("dense", lambda: F.conv2d(xg, wg, bg, s, p).backward(gy), 3 * flops_d, 3 * bytes_d, [xg, wg, bg]),
        ]:  # fmt: skip
            try:
                ms, timer = time_ms(fn, DEVICE, use_graph=False, grad_to_none=leaves)
                rec.add(perf_row("tucker_fwd_bwd", case, provider, ms, timer, fl, by, peaks, param_ratio=ratio))
                print(f"    fwd+bwd {provider}: {ms * 1e3:.1f} us", flush=True)
            except Exception as exc:  # noqa: BLE001
                rec.error(f"{case} fwd+bwd {provider}", exc)


MPO_CHECKS = [(7, (3, 5, 7), (2, 3, 5), 6), (33, (4, 4, 10, 10), (8, 8, 10, 10), 32), (33, (160, 1), (1, 96), 24)]
TUCKER_CHECKS = [(2, 19, 9, 5, 3, 2, 1), (4, 64, 14, 32, 3, 1, 1), (2, 96, 8, 160, 3, 1, 1)]
# --smoke-cpu: the same code paths on shapes the interpreter finishes in seconds.
SMOKE = {
    "mpo_checks": [(3, (3, 5), (2, 3), 4), (3, (15, 1), (1, 6), 4)],
    "tucker_checks": [(1, 5, 5, 3, 3, 1, 1)],
    "layers": [("tiny", (3, 5), (2, 3))],
    "rows": [1, 4],
    "bonds": [4],
    "tucker_grid": [(1, 4, 5, 5, 4, 2, 3, 3, 1)],
}


def summarize(rows: list[dict]) -> dict:
    """The issue's three targets, evaluated on the MPO forward rows that have all three providers."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("phase") == "perf" and r["op"] == "mpo_fwd":
            by_case.setdefault(r["case"], {})[r["provider"]] = r
    cases = []
    for case, p in by_case.items():
        if {"triton", "torch", "dense"} <= p.keys():
            t = p["triton"]
            cases.append({
                "case": case, "rows": t["rows"], "param_ratio": t["param_ratio"],
                "vs_torch": p["torch"]["ms"] / t["ms"], "vs_dense": p["dense"]["ms"] / t["ms"],
                "pct_roofline": t["pct_roofline"],
            })  # fmt: skip
    decode = [c for c in cases if c["rows"] <= 16]
    return {
        "cases": cases,
        "best_vs_torch": max((c["vs_torch"] for c in cases), default=None),
        "cases_ge_1.5x_vs_torch": sum(c["vs_torch"] >= 1.5 for c in cases),
        "cases_ge_60pct_roofline": sum(c["pct_roofline"] >= 60 for c in cases),
        "decode_cases": len(decode),
        "decode_cases_beating_dense_by_half_ratio": sum(c["vs_dense"] >= c["param_ratio"] / 2 for c in decode),
        "n_cases": len(cases),
    }


def main(argv=None) -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--rows", default="1,4,16,256,4096", help="MPO row counts, comma-separated")
    ap.add_argument("--bonds", default="64,256", help="MPO max bonds, comma-separated")
    ap.add_argument(
        "--smoke-cpu",
        action="store_true",
        help="exercise this script on the CPU under TRITON_INTERPRET=1 with tiny shapes (no real timing)",
    )
    args = ap.parse_args(argv)
    if args.smoke_cpu:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_bench --smoke-cpu: set TRITON_INTERPRET=1 (before Python starts) to run on the CPU")
            return 2
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; run it on a machine with a GPU (nothing was measured)")
        return 2
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_bench: unset TRITON_INTERPRET to time the compiled kernels")
        return 2
    t0 = time.time()
    deadline = t0 + args.budget_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "gpu": props.name,
            "sms": props.multi_processor_count,
            "gpu_mem_gib": props.total_memory / 2**30,
        }
    else:
        gpu = {"gpu": "cpu-interpreter-smoke", "sms": 0, "gpu_mem_gib": 0}
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **gpu,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "host": platform.node(), "args": vars(args),
    }  # fmt: skip
    rec = Recorder(out_dir, meta)
    print(f"gpu_bench on {meta['gpu']}; writing {rec.json_path} and {rec.csv_path}", flush=True)
    try:
        meta.update(measure_peaks(DEVICE))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # return the 4 GiB of peak-measurement buffers
    except Exception as exc:  # noqa: BLE001 - fall back to H200 datasheet-like numbers, flagged as such
        rec.error("peaks", exc)
        meta.update({"peak_bf16_tflops": 989.0, "peak_gbs": 4800.0, "peaks_assumed": True})
    print(f"peaks: {meta['peak_bf16_tflops']:.0f} TFLOP/s bf16, {meta['peak_gbs']:.0f} GB/s", flush=True)
    smoke = args.smoke_cpu
    print("phase 2: correctness", flush=True)
    if smoke:  # fp32 only: bf16 adds interpreter time and no code path
        check_correctness(rec, SMOKE["mpo_checks"], SMOKE["tucker_checks"], (torch.float32,))
    else:
        check_correctness(rec, MPO_CHECKS, TUCKER_CHECKS, (torch.float32, torch.bfloat16))
    print(f"phase 3: MPO grid ({time.time() - t0:.0f} s elapsed)", flush=True)
    rows_list = SMOKE["rows"] if smoke else [int(r) for r in args.rows.split(",")]
    bonds = SMOKE["bonds"] if smoke else [int(b) for b in args.bonds.split(",")]
    try:
        bench_mpo(rec, meta, deadline, rows_list, bonds, SMOKE["layers"] if smoke else GPT2_XL)
    except Exception as exc:  # noqa: BLE001
        rec.error("mpo grid", exc)
    print(f"phase 4: Tucker grid ({time.time() - t0:.0f} s elapsed)", flush=True)
    try:
        # The Tucker grid is short; it gets 30 s past the MPO budget so a slow MPO phase does not starve it.
        bench_tucker(rec, meta, deadline + 30, SMOKE["tucker_grid"] if smoke else TUCKER_GRID)
    except Exception as exc:  # noqa: BLE001
        rec.error("tucker grid", exc)
    meta["seconds"] = time.time() - t0
    summary = summarize(rec.rows)
    meta["summary"] = {k: v for k, v in summary.items() if k != "cases"}
    rec.flush()
    for c in summary["cases"]:
        print(f"  {c['case']}: {c['vs_torch']:.2f}x vs torch, {c['vs_dense']:.2f}x vs dense (ratio "
              f"{c['param_ratio']:.1f}), {c['pct_roofline']:.0f}% roofline", flush=True)  # fmt: skip
    print(f"summary: {meta['summary']}", flush=True)
    bad = [r for r in rec.rows if r.get("phase") == "correctness" and not r["ok"]]
    print(f"done in {meta['seconds']:.0f} s: {len(rec.rows)} rows, {len(rec.errors)} errors, {len(bad)} failed "
          f"correctness checks, {len(rec.skipped)} skipped; {rec.json_path}", flush=True)  # fmt: skip
    return 1 if bad or rec.errors else 0


if __name__ == "__main__":
    sys.exit(main())

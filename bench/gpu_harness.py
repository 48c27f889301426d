"""Measurement plumbing of bench/gpu_bench.py: the crash-safe recorder of result rows, CUDA-graph timing, the
measured peaks (the roofline's ceilings), and the row format of a timed case."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
import traceback
from pathlib import Path

import torch

from distill._atomic import atomic_write_text


def rel_rms(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().double(), e.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


class Recorder:
    """Collects rows and rewrites JSON + CSV after each one, so partial results survive a crash or a timeout."""

    def __init__(self, out_dir: Path, meta: dict):
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.json_path = out_dir / f"gpu_bench_{stamp}.json"
        self.csv_path = out_dir / f"gpu_bench_{stamp}.csv"
        self.meta = meta
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.skipped: list[str] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()

    def error(self, case: str, exc: BaseException) -> None:
        print(f"  ERROR in {case}: {type(exc).__name__}: {exc}", flush=True)
        self.errors.append({"case": case, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        self.flush()

    def flush(self) -> None:
        doc = {"meta": self.meta, "rows": self.rows, "errors": self.errors, "skipped": self.skipped}
        atomic_write_text(self.json_path, json.dumps(doc, indent=1, default=str))
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        lines = []
        if keys:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=["date", "gpu", *keys])
            w.writeheader()
            for r in self.rows:
                w.writerow({"date": self.meta["date"], "gpu": self.meta["gpu"], **r})
            lines.append(buf.getvalue())
        atomic_write_text(self.csv_path, "".join(lines))


def time_ms(fn, device: str, use_graph: bool = True, grad_to_none=None) -> tuple[float, str]:
    """Median time of fn() in ms; CUDA-graph replay when possible (no launch overhead), else plain do_bench.
    On "cpu" (the smoke mode) one call exercises the code path and the number means nothing."""
    import triton.testing as tt

    if device == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3, "perf_counter"
    fn()  # warm up: compiles and autotunes outside the timed region / graph capture
    torch.cuda.synchronize()
    if use_graph:
        try:
            return float(tt.do_bench_cudagraph(fn, rep=20, return_mode="median")), "cudagraph"
        except Exception:  # capture can fail (e.g. a host sync inside fn); fall back and say so
            torch.cuda.synchronize()
    ms = tt.do_bench(fn, warmup=5, rep=20, grad_to_none=grad_to_none, return_mode="median")
    return float(ms), "do_bench"


def measure_peaks(device: str) -> dict:
    """Achievable bf16 matmul TFLOP/s and copy GB/s on this GPU (the roofline's ceilings)."""
    import triton.testing as tt

    if device == "cpu":
        return {"peak_bf16_tflops": 1.0, "peak_gbs": 10.0, "peaks_assumed": True}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = tt.do_bench(lambda: a @ b, warmup=10, rep=50)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    src = torch.empty(2 * 1024**3 // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms_c = tt.do_bench(lambda: dst.copy_(src), warmup=5, rep=30)
    gbs = 2 * src.numel() * 2 / (ms_c * 1e-3) / 1e9  # read + write
    return {"peak_bf16_tflops": tflops, "peak_gbs": gbs}


def perf_row(op, case, provider, ms, timer, flops, min_bytes, peaks, **extra) -> dict:
    t = ms * 1e-3
    roof = max(flops / (peaks["peak_bf16_tflops"] * 1e12), min_bytes / (peaks["peak_gbs"] * 1e9))
    return {
        "phase": "perf", "op": op, "case": case, "provider": provider, "ms": ms, "timer": timer,
        "tflops": flops / t / 1e12, "gbs": min_bytes / t / 1e9, "roofline_ms": roof * 1e3,
        "pct_roofline": 100 * roof / t, **extra,
    }  # fmt: skip

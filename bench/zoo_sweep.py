"""tensorize across the torchvision model zoo: every classification model (and a few others), one process each.

    python bench/zoo_sweep.py                          # the whole classification zoo + the extra models
    python bench/zoo_sweep.py --models mobilenet_v3_small swin_t --tag quick
    python bench/zoo_sweep.py --big                    # also vit_h_14, regnet_y_128gf, vit_l_16, ... (slow)

Each model runs `bench/zoo_probe.py` in a fresh process (its peak RSS is its own, a crash ends only that row) with
random weights (weights=None), eval mode and the smallest input it accepts: tensorize at ratio 2 with the default
rules, then forward (finite, same shape), report (every dense layer listed with a reason), backward (train mode,
batch 2), save_compressed / load_compressed into a fresh skeleton (bit-identical output), parameter count against
the report, and for models under --exact-limit parameters a full-rank tensorize that must reproduce the dense
output. Results: bench/results/zoo_sweep_<date>[-tag].{md,json}, with the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
BIG = ["vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_x_32gf", "efficientnet_v2_l"]
EXTRA = [
    "fcn_resnet50",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320_mobilenet_v3_large",
    "raft_small",
    "r3d_18",
    "r2plus1d_18",
    "s3d",
    "swin3d_t",
    "mvit_v2_s",
]
CHECKS = ("forward_ok", "reasons_ok", "params_ok", "roundtrip_ok", "backward_ok")


def models(big: bool) -> list[str]:
    names = [n for n in torchvision.models.list_models(module=torchvision.models) if n not in BIG]
    return names + EXTRA + (BIG if big else [])


def run_one(name: str, timeout: float, exact_limit: int, ratio: float, threads: int) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "zoo_probe.py"), name, "--ratio", str(ratio)]
    cmd += ["--exact-limit", str(exact_limit), "--threads", str(threads)]
    load = os.getloadavg()[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "errors": {"process": f"timed out after {timeout:g} s"}, "wall_s": timeout}
    rows = [line[7:] for line in proc.stdout.splitlines() if line.startswith("ZOOROW ")]
    if not rows:
        tail = (proc.stderr or proc.stdout)[-800:]
        return {"model": name, "errors": {"process": f"exit {proc.returncode}: {tail}"}, "wall_s": 0}
    row = json.loads(rows[-1])
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["load_avg"] = [round(load, 1), round(os.getloadavg()[0], 1)]  # other processes on the machine: before, after
    return row


def clean(row: dict) -> bool:
    """Every check passed and nothing crashed (exact_ok is checked only where it ran)."""
    if row.get("errors"):
        return False
    skipped = {"backward_ok"} if row.get("kind") == "detection" else set()
    if row.get("converted") == 0:  # nothing tensorized (s3d): no checkpoint to write, no factor to differentiate
        skipped |= {"backward_ok", "roundtrip_ok"}
    ok = all(row.get(k) is True for k in CHECKS if k not in skipped)
    return ok and row.get("exact_ok", True) is True and not row.get("unlisted")


def markdown(rows: list[dict], meta: dict) -> str:
    out = [
        f"# tensorize across the torchvision zoo ({meta['date']})",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, torchvision {meta['torchvision']}; "
        f"{meta['threads']} threads; ratio {meta['ratio']:g}, default rules; random weights. "
        f"Command: `{meta['command']}`. Clean: {meta['clean']} of {len(rows)} models.",
        "",
        *summary(rows),
        *(["", "Notes:", *(f"- {n}" for n in meta["notes"])] if meta.get("notes") else []),
        "",
        "Columns: layers converted; layers left dense, grouped by the report's reason; weight layers left dense "
        "without a report row (must be 0); parameters of the whole model; tensorize's wall time; the process's peak "
        "RSS after tensorize (the dense model, and for models under the exact limit a copy of it, included); fwd: "
        "finite output of the dense output's shape; bwd: train mode, batch 2, finite gradients on every factor; "
        "round trip: save_compressed + load_compressed into a fresh skeleton, same output bit for bit; exact: "
        "tensorized at full rank instead, the dense output within 1e-4 relative; load: the machine's load average "
        "before / after the model (other jobs shared the 2 cores).",
        "",
        "| model | input | converted | dense (reasons) | unlisted | params before -> after (M) | tensorize s "
        "| peak RSS MiB | fwd | bwd | round trip | exact | load | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def flag(v):
        return "-" if v is None else ("ok" if v else "**FAIL**")

    for r in rows:
        reasons: dict[str, int] = {}
        for why in r.get("dense", {}).values():
            key = reason_label(why)
            reasons[key] = reasons.get(key, 0) + 1
        dense = "; ".join(f"{n} {k}" for k, n in reasons.items()) or "0"
        unl = r.get("unlisted") or {}
        unlisted = ", ".join(sorted({f"{v} x{list(unl.values()).count(v)}" for v in unl.values()})) or "0"
        pb, pa = r.get("params_before"), r.get("params_after")
        params = f"{pb / 1e6:.2f} -> {pa / 1e6:.2f}" if pb and pa else "-"
        if r.get("params_ok") is False:
            params += " **mismatch**"
        errors = "; ".join(f"{k}: {v[:120]}" for k, v in (r.get("errors") or {}).items()).replace("|", "/")
        first = (r.get("input") or [[]])[0]  # the first input's shape; detection models take a list of images
        shape = "x".join(map(str, first[0] if first and isinstance(first[0], list) else first)) or "-"
        out.append(
            f"| {r['model']} | {shape} | {r.get('converted', '-')} | {dense} | {unlisted} | {params} | "
            f"{r.get('tensorize_s', '-')} | {r.get('peak_rss_mib', '-')} | {flag(r.get('forward_ok'))} | "
            f"{flag(r.get('backward_ok'))} | {flag(r.get('roundtrip_ok'))} | {flag(r.get('exact_ok'))} | "
            f"{'-'.join(map(str, r.get('load_avg', [])))} | {errors} |"
        )
    return "\n".join(out) + "\n"


def reason_label(why: str) -> str:
    """A short label of a report's reason, to group the layers left dense."""
    if "cannot be reached" in why:
        return "ratio unreachable"
    if " reads its dense .weight" in why:
        return why.split(" reads ")[0] + " reads .weight"
    if why.startswith("inside nn.MultiheadAttention"):
        return "inside nn.MultiheadAttention"
    return why.split(" (")[0]


def summary(rows: list[dict]) -> list[str]:
    """Bullet points: what passed, what did not, where the time and memory went."""
    bad = [r for r in rows if not clean(r)]
    none = [r["model"] for r in rows if r.get("converted") == 0]
    reasons: dict[str, int] = {}
    for r in rows:
        for why in r.get("dense", {}).values():
            key = reason_label(why)
            reasons[key] = reasons.get(key, 0) + 1
    converted = sum(r.get("converted") or 0 for r in rows)
    slow = sorted((r for r in rows if "tensorize_s" in r), key=lambda r: -r["tensorize_s"])[:5]
    heavy = sorted((r for r in rows if "peak_rss_mib" in r), key=lambda r: -r["peak_rss_mib"])[:5]
    lines = [
        f"- {len(rows) - len(bad)} of {len(rows)} models clean"
        + (f"; not clean: {', '.join(r['model'] + ' (' + _why(r) + ')' for r in bad)}" if bad else ""),
        f"- {converted} layers tensorized, {sum(reasons.values())} left dense with a reason: "
        + "; ".join(f"{n} {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])),
        f"- nothing to tensorize: {', '.join(none) or 'none'}",
        "- slowest tensorize: " + ", ".join(f"{r['model']} {r['tensorize_s']:g} s" for r in slow),
        "- largest peak RSS: "
        + ", ".join(
            f"{r['model']} {r['peak_rss_mib'] / 1024:.1f} GiB (+{(r['peak_rss_mib'] - r['rss_before_mib']) / 1024:.1f} "
            "over the model before tensorize)"
            for r in heavy
        ),  # fmt: skip
    ]
    return lines


def _why(row: dict) -> str:
    failed = [k for k in (*CHECKS, "exact_ok") if row.get(k) is False]
    return "; ".join([*(row.get("errors") or {}), *failed, *(["unlisted layers"] if row.get("unlisted") else [])])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="model names (default: the classification zoo and a few others)")
    p.add_argument("--big", action="store_true", help="include the largest models: " + ", ".join(BIG))
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--threads", type=int, default=1, help="torch threads per model (1: steady on a shared machine)")
    p.add_argument("--exact-limit", type=float, default=100e6, help="full-rank check only below this many params")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", type=Path, help="only write the markdown of this JSON result again")
    a = p.parse_args(argv)
    if a.render:
        data = json.loads(a.render.read_text())
        a.render.with_suffix(".md").write_text(markdown(data["rows"], data["meta"]))
        return
    names = a.models or models(a.big)
    date = datetime.date.today().isoformat()
    stem = f"zoo_sweep_{date}" + (f"-{a.tag}" if a.tag else "")
    a.out.mkdir(parents=True, exist_ok=True)
    json_path = a.out / f"{stem}.json"
    done = {}
    if json_path.exists():  # resume: a rerun with the same tag keeps the finished rows
        done = {r["model"]: r for r in json.loads(json_path.read_text())["rows"]}
    meta = {
        "date": date,
        "machine": machine(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": a.threads,
        "ratio": a.ratio,
        "command": "python bench/zoo_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows = []
    for name in names:
        if name in done:
            rows.append(done[name])
            continue
        row = run_one(name, a.timeout, int(a.exact_limit), a.ratio, a.threads)
        row.pop("tracebacks", None)
        rows.append(row)
        status = "clean" if clean(row) else f"NOT CLEAN {row.get('errors') or ''}"
        print(f"{name}: {row.get('wall_s')} s, {status}", flush=True)
        meta["clean"] = sum(clean(r) for r in rows)
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    meta["clean"] = sum(clean(r) for r in rows)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (a.out / f"{stem}.md").write_text(markdown(rows, meta))
    print(f"{meta['clean']} of {len(rows)} clean; {json_path}")


if __name__ == "__main__":
    main()

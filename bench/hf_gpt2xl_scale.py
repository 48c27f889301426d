"""Scale: a model with GPT-2 XL's shapes (48 blocks, hidden 1600, MLP 6400), random weights, on a CPU.

Runs the HF pipeline's stages on it: block-by-block teacher capture of all 48 MLP slices with activations on
disk (``distill.hf.capture``), then tensorizing and training the first ``--train-slices`` slices of this rank's
share (``distill.hf.train``; all of them by default), deleting each slice's features once it is trained, as the
pipeline does. It records peak RSS (``resource.getrusage``), RSS after every captured block and after every
trained slice (from /proc/self/statm), the peak RSS so far after every slice (the evidence that memory does not
grow with the number of slices), bytes on disk, and the time of every slice (load, tensorize, train).

It is about memory and plumbing, not accuracy: a few random-token sequences and a few steps per slice.

    python bench/hf_gpt2xl_scale.py --steps 3
    torchrun --nproc_per_node 2 bench/hf_gpt2xl_scale.py --n-layer 16 --steps 3

Each rank writes ``<results>.rank<r>.json``; rank 0 merges them into ``<results>`` once all are there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distill._atomic import atomic_write_text  # noqa: E402
from distill.hf.capture import capture_features, load_slice_features  # noqa: E402
from distill.hf.models import build_from_config  # noqa: E402
from distill.hf.pipeline import my_share  # noqa: E402
from distill.hf.presets import ATTENTION_PATTERNS, resolve, slice_specs  # noqa: E402
from distill.hf.train import tensorize_slice, train_slice  # noqa: E402
from distill.torchrun import dist_env  # noqa: E402


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=48)
    p.add_argument("--n-embd", type=int, default=1600)
    p.add_argument("--n-head", type=int, default=25)
    p.add_argument("--n-inner", type=int, default=6400)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seqs", type=int, default=4, help="calibration sequences (random token ids)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument(
        "--train-slices", type=int, default=-1, help="slices of this rank's share to train (0: none, -1: all)"
    )
    p.add_argument("--steps", type=int, default=3, help="training steps per slice")
    p.add_argument(
        "--num-cores",
        type=int,
        default=3,
        help="MPO cores per layer (3: a 6400x1600 matrix decomposes in about a second; 0: let the planner "
        "choose, which tries several structures and took 80-124 s per matrix on the shared CPU)",
    )
    p.add_argument("--fp16-features", action="store_true")
    p.add_argument("--work", default="/tmp/tnk_gpt2xl_scale", help="feature store folder (deleted at the end)")
    p.add_argument("--results", default="bench/results/hf_gpt2xl_scale.json")
    args = p.parse_args()
    rank, world = dist_env()
    log = {"rank": rank, "world": world, "args": vars(args)}
    t0 = time.perf_counter()
    model = build_from_config(
        "gpt2",
        causal_lm=False,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_inner=args.n_inner,
        vocab_size=args.vocab,
        n_positions=1024,
    )
    log["build_seconds"] = time.perf_counter() - t0
    log["params"] = sum(p.numel() for p in model.parameters())
    log["rss_after_build_gib"] = rss_gib()
    print(
        f"[rank {rank}] built {log['params'] / 1e9:.2f}B params in {log['build_seconds']:.0f}s, "
        f"RSS {log['rss_after_build_gib']:.2f} GiB",
        flush=True,
    )

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.seqs, args.seq_len), generator=g)
    calib = [{"input_ids": ids[i : i + args.batch_size]} for i in range(0, args.seqs, args.batch_size)]
    specs = my_share(slice_specs(model, "mlp"), rank, world)
    store = Path(args.work) / f"rank{rank}"
    shutil.rmtree(store, ignore_errors=True)
    per_block = []
    t_cap = time.perf_counter()

    def on_block(i: int) -> None:
        per_block.append(
            {
                "block": i,
                "seconds": time.perf_counter() - t_cap,
                "rss_gib": rss_gib(),
                "store_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()),
            }
        )
        if i % 8 == 0 or i == args.n_layer - 1:
            print(
                f"[rank {rank}] block {i}: RSS {per_block[-1]['rss_gib']:.2f} GiB, store "
                f"{per_block[-1]['store_bytes'] / 2**20:.0f} MiB, {per_block[-1]['seconds']:.0f}s",
                flush=True,
            )

    cap = capture_features(
        model,
        specs,
        calib,
        store,
        store_dtype=torch.float16 if args.fp16_features else None,
        progress=False,
        on_block=on_block,
    )
    log["capture"] = {
        **cap,
        "seconds": time.perf_counter() - t_cap,
        "slices": len(specs),
        "per_block": per_block,
        "peak_rss_gib": peak_rss_gib(),
    }
    rss = [b["rss_gib"] for b in per_block]
    log["capture"]["rss_first_block_gib"], log["capture"]["rss_last_block_gib"] = rss[0], rss[-1]
    log["capture"]["rss_max_over_blocks_gib"] = max(rss)

    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"{out.stem}.rank{rank}.json")

    def dump() -> None:  # after every stage, so a run stopped early still leaves its measurements
        atomic_write_text(part, json.dumps(log, indent=2))

    dump()
    log["slices"] = []
    to_train = specs if args.train_slices < 0 else specs[: args.train_slices]
    for k, s in enumerate(to_train, 1):
        t = time.perf_counter()
        data = load_slice_features(store, s.name)
        t_load = time.perf_counter() - t
        student, rep = tensorize_slice(
            resolve(model, s),
            ratio=args.ratio,
            attention=False,
            attention_patterns=ATTENTION_PATTERNS["gpt2"],
            num_cores=args.num_cores or None,
        )
        t_dec = time.perf_counter() - t - t_load
        stats = train_slice(s, student, data, steps=args.steps, eval_every=max(1, args.steps))
        del data, student
        shutil.rmtree(store / s.name, ignore_errors=True)  # as the pipeline does once a slice is trained
        row = {
            **stats,
            "load_seconds": t_load,
            "tensorize_seconds": t_dec,
            "total_seconds": time.perf_counter() - t,
            "slices_done": k,
            "rss_gib": rss_gib(),
            "peak_rss_so_far_gib": peak_rss_gib(),
            "store_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()),
            "loadavg": loadavg(),
            "layers": [(r.name, list(r.shape), r.ratio, r.rel_error) for r in rep.rows],
        }
        log["slices"].append(row)
        dump()
        print(
            f"[rank {rank}] {s.name} ({k}/{len(to_train)}): tensorize {t_dec:.1f}s, train {stats['steps']} "
            f"steps {stats['seconds']:.1f}s, nmse {stats['initial_nmse']:.3f} -> {stats['final_nmse']:.3f}, "
            f"RSS {row['rss_gib']:.2f} GiB, peak {row['peak_rss_so_far_gib']:.2f} GiB",
            flush=True,
        )
    log["peak_rss_gib"] = peak_rss_gib()
    if log["slices"]:
        rows = log["slices"]
        log["summary"] = {
            "slices_trained": len(rows),
            "seconds_per_slice_mean": sum(r["total_seconds"] for r in rows) / len(rows),
            "tensorize_seconds_mean": sum(r["tensorize_seconds"] for r in rows) / len(rows),
            "train_seconds_mean": sum(r["seconds"] for r in rows) / len(rows),
            "rss_gib_after_first_slice": rows[0]["rss_gib"],
            "rss_gib_after_last_slice": rows[-1]["rss_gib"],
            "rss_gib_max_over_slices": max(r["rss_gib"] for r in rows),
            # ru_maxrss after 1, 8, 16, ... slices: flat = memory does not grow with the number of slices
            "peak_rss_gib_after_n_slices": {
                str(r["slices_done"]): r["peak_rss_so_far_gib"]
                for r in rows
                if r["slices_done"] in (1, 2, 4, 8, 16, 24, 32, 48) or r is rows[-1]
            },
        }
    shutil.rmtree(store, ignore_errors=True)
    log["finished"] = True
    dump()
    if rank == 0:
        parts = [out.with_name(f"{out.stem}.rank{r}.json") for r in range(world)]

        def finished(q: Path) -> bool:  # a part is dumped after every stage: wait for the last one
            try:
                return q.is_file() and json.loads(q.read_text()).get("finished", False)
            except json.JSONDecodeError:
                return False

        while not all(finished(q) for q in parts):
            time.sleep(2)
        merged = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "hardware": {
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "mem_total_gib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30,
                "torch": torch.__version__,
                "note": "timings depend on the machine's load (loadavg fields)",
            },
            "command": " ".join(["torchrun" if world > 1 else "python"] + sys.argv),
            "loadavg_end": loadavg(),
            "ranks": [json.loads(q.read_text()) for q in parts],
        }
        atomic_write_text(out, json.dumps(merged, indent=2))
        for q in parts:
            q.unlink()


if __name__ == "__main__":
    main()

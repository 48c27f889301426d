"""Reproduce issue 4's numbers: slice-wise distillation vs the global fine-tune baseline, ResNet-34 / digits.

Measures, on the held-out digits test split (360 images):
  - the teacher's accuracy;
  - slice-wise distillation (per-block slices, no global fine-tune) at 2x and 4x compression of the conv
    layers inside the residual stages, in the main mode (--mode, default sequential, the CLI default) and in
    the other mode (phase othermode), with its time per phase;
  - the global baseline at the same ratios: the same layers tensorized, then end-to-end fine-tuning on
    cross-entropy, given exactly the main slice-wise run's time (its own tensorization included);
  - slice-wise at 2x with only 10% of the training images as calibration data, and (phase global10) the global
    baseline given the same 10% of the images (with their labels) and the same time;
  - the speed-up of 2 worker processes over 1 for the slice training phase (parallel mode).

Time accounting (--clock): "cpu" (default) charges both methods the CPU time of this process
(time.process_time, single-threaded with --threads 1), which stays fair when other jobs share the machine;
"wall" uses wall-clock time, which is only fair on an otherwise idle machine. Both are recorded.

Every phase appends to bench/results/distill_resnet_<date>.json (written atomically after each phase, so an
interrupted run keeps what it finished) and the markdown table next to it, plus two plots.

    python bench/distill_resnet.py                       # everything, ~20-30 min on 2 cores
    python bench/distill_resnet.py --phases teacher,slice --ratios 2   # a subset

The machine this runs on may be shared; the JSON records the load average before and after each phase.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import tnkernels  # noqa: E402
from distill._atomic import atomic_write_bytes, atomic_write_json  # noqa: E402
from distill.data import calibration_subset, load_digits  # noqa: E402
from distill.global_baseline import global_finetune  # noqa: E402
from distill.plots import plot_accuracy_vs_ratio, plot_slice_losses  # noqa: E402
from distill.runner import distill  # noqa: E402
from distill.sensitivity import layer_rule_pattern  # noqa: E402
from distill.teacher import evaluate, get_teacher  # noqa: E402
from distill.train_slice import SliceTrainConfig  # noqa: E402

PHASES = ("teacher", "slice", "global", "othermode", "calib10", "global10", "speedup")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet34")
    p.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--slices", default="per-block")
    p.add_argument("--mode", choices=("sequential", "parallel"), default="sequential", help="main slice-wise mode")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="time accounting of the equal budget")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = single-core time)")
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=None,
        help="only for smoke tests with TNK_CACHE_DIR set to a scratch folder (the cache key ignores it)",
    )
    p.add_argument("--max-steps", type=int, default=200, help="per-slice training steps (early stopping may cut)")
    p.add_argument("--slice-batch", type=int, default=64)
    p.add_argument("--slice-lr", type=float, default=1e-3)
    p.add_argument("--calib-fraction", type=float, default=1.0, help="calibration share for the main runs")
    p.add_argument("--small-fraction", type=float, default=0.1, help="calibration share for the calib10 phase")
    p.add_argument("--workers", type=int, default=2, help="worker count compared with 1 in the speedup phase")
    p.add_argument("--global-lr", type=float, default=5e-4)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--global-kd", type=float, default=0.0, help="KD weight of the global baseline (0 = CE only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default=time.strftime("%Y-%m-%d", time.gmtime()))
    p.add_argument("--work-dir", default=None, help="slice checkpoints (default: a fresh temporary folder)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--reference-json", default=None, help="phase global10 without calib10: its slice-wise row")
    p.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="only rebuild the markdown table and plots from an existing results JSON",
    )
    p.add_argument(
        "--merge",
        metavar="JSON",
        nargs="+",
        default=None,
        help="combine the runs of several results JSONs (phases run as separate processes) into --tag's files",
    )
    args = p.parse_args(argv)
    bad = set(args.phases.split(",")) - set(PHASES)
    if bad:
        p.error(f"--phases: unknown {sorted(bad)}; choose from {','.join(PHASES)}")
    return args


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.json_path = self.out / f"distill_resnet_{args.tag}.json"
        self.md_path = self.out / f"distill_resnet_{args.tag}.md"
        self.work = Path(args.work_dir) if args.work_dir else None  # made in run(), not for --render
        self.progress = not args.no_progress
        self.results: dict = {
            "meta": {
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "tnkernels": getattr(tnkernels, "__version__", "?"),
                "note": "CPU only; the machine may be shared with other jobs (see load averages per run)",
                "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
            },
            "runs": [],
        }

    # ---- bookkeeping ----
    def save(self) -> None:
        atomic_write_json(self.json_path, self.results)
        md = self.markdown().encode()
        atomic_write_bytes(self.md_path, lambda f: f.write(md))

    def add(self, run: dict) -> dict:
        self.results["runs"].append(run)
        self.save()
        print(
            f"[bench] {run['name']}: "
            + ", ".join(f"{k}={v}" for k, v in run.items() if k in ("accuracy", "achieved_ratio", "seconds")),
            flush=True,
        )
        return run

    def model_name(self) -> str:
        return str(self.results["meta"]["settings"].get("model", "resnet34"))

    def markdown(self) -> str:
        t = self.results.get("teacher", {})
        lines = [
            f"# {self.model_name()} on digits: slice-wise vs global ({self.results['meta']['date_utc']})",
            "",
            f"Teacher test accuracy: **{t.get('accuracy', float('nan')):.4f}** "
            f"({t.get('test_images', '?')} held-out images). {self.results['meta']['note']}.",
            "",
            f"Equal-time budget on the {self.clock_name()} clock; {self.results['meta']['torch_threads']} "
            f"torch thread(s). Load average (1/5/15 min) before and after each run in the last column.",
            "",
            "| run | target | achieved | calib imgs | workers | test acc | vs teacher | wall (s) | CPU (s) | detail "
            "| load |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        ta = t.get("accuracy")
        for r in self.results["runs"]:
            acc = r.get("accuracy")
            delta = f"{100 * (acc - ta):+.2f} pt" if acc is not None and ta is not None else "-"
            lines.append(
                f"| {r['name']} | {r.get('ratio', '-')}x | {r.get('achieved_ratio', 0):.2f}x | "
                f"{r.get('calib_images', '-')} | {r.get('workers', '-')} | "
                f"{'-' if acc is None else f'{acc:.4f}'} | {delta} | {r.get('seconds', 0):.0f} | "
                f"{r.get('cpu_seconds', float('nan')):.0f} | {r.get('detail', '')} | "
                f"{r.get('load_before', '')} -> {r.get('load_after', '')} |"
            )
        if "speedup" in self.results:
            s = self.results["speedup"]
            lines += [
                "",
                f"Slice training (parallel mode) with {s['workers']} workers vs 1: {s['train_speedup']:.2f}x "
                f"faster in wall-clock (train phase {s['train_s_1']:.0f}s -> {s['train_s_n']:.0f}s; whole run "
                f"{s['total_s_1']:.0f}s -> {s['total_s_n']:.0f}s; load {s.get('load_1', '?')} / "
                f"{s.get('load_n', '?')}).",
            ]
        lines += ["", f"Command: `{self.results['meta']['command']}`", ""]
        return "\n".join(lines)

    # ---- phases ----
    def setup(self) -> None:
        t0 = time.perf_counter()
        self.train_ds, self.test_ds = load_digits(image_size=32)
        self.test_loader = DataLoader(self.test_ds, batch_size=256)
        extra = {} if self.args.teacher_epochs is None else {"epochs": self.args.teacher_epochs}
        self.teacher = get_teacher(
            self.args.model,
            data="digits",
            datasets=(self.train_ds, self.test_ds),
            seed=self.args.seed,
            progress=self.progress,
            **extra,
        )
        acc = evaluate(self.teacher, self.test_loader)
        self.results["teacher"] = {
            "model": self.args.model,
            "accuracy": acc,
            "test_images": len(self.test_ds),
            "train_images": len(self.train_ds),
            "seconds_load_or_train": time.perf_counter() - t0,
        }
        self.save()
        print(f"[bench] teacher {self.args.model}: test accuracy {acc:.4f}", flush=True)

    def config(self, **over) -> SliceTrainConfig:
        a = self.args
        kw = dict(max_steps=a.max_steps, batch_size=a.slice_batch, lr=a.slice_lr, seed=a.seed) | over
        return SliceTrainConfig(**kw)

    def reference_row(self, name: str) -> dict:
        """A slice-wise row measured earlier (--reference-json), to give the global baseline the same budget."""
        import json

        if not self.args.reference_json:
            raise ValueError(f"phase global10 needs the row {name!r}: run phase calib10 too, or --reference-json")
        ref = json.loads(Path(self.args.reference_json).read_text())
        if ref["teacher"]["accuracy"] != self.results["teacher"]["accuracy"]:
            raise ValueError(f"--reference-json {self.args.reference_json}: measured with another teacher")
        if ref["meta"]["settings"].get("clock") != self.args.clock:
            raise ValueError(f"--reference-json {self.args.reference_json}: measured on another clock")
        for r in ref["runs"]:
            if r["name"] == name:
                return r
        raise ValueError(f"--reference-json {self.args.reference_json}: no row {name!r}")

    def clock_name(self) -> str:
        return "CPU-time" if self.results["meta"]["settings"].get("clock") == "cpu" else "wall-clock"

    def spent(self, run: dict) -> float:
        """The run's time on the clock of the equal budget."""
        return run["cpu_seconds"] if self.args.clock == "cpu" else run["seconds"]

    def slicewise(
        self, name: str, ratio: float, fraction: float, workers: int, series: str | None = None, mode=None, **cfg
    ) -> dict:
        mode = mode or self.args.mode
        calib = calibration_subset(self.train_ds, fraction, seed=self.args.seed)
        loader = DataLoader(calib, batch_size=128, shuffle=False)
        la = load()
        t0, c0 = time.perf_counter(), time.process_time()
        res = distill(
            self.teacher,
            loader,
            slices=self.args.slices,
            ratio=ratio,
            mode=mode,
            workers=workers,
            out_dir=self.work / name,
            config=self.config(**cfg),
            progress=self.progress,
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        acc = evaluate(res.student, self.test_loader)
        layers = [row for s in res.slices.values() for row in s.layers if row.get("status") == "tensorized"]
        before = sum(r["params_before"] for r in layers)
        after = sum(r["params_after"] for r in layers)
        return {
            "name": name,
            "method": "slice-wise",
            "mode": mode,
            "series": series,
            "ratio": ratio,
            "calib_images": len(calib),
            "workers": workers,
            "accuracy": acc,
            "achieved_ratio": before / after if after else 1.0,
            "seconds": wall,
            "cpu_seconds": cpu,  # this process only: worker processes' CPU is not included
            "timings": res.timings,
            "chained": res.chained,
            "layers": [r["name"] for r in layers],
            "params_before": before,
            "params_after": after,
            "load_before": la,
            "load_after": load(),
            "detail": f"{mode}, {len(res.slices)} slices, {sum(s.steps for s in res.slices.values())} steps",
            "slices": {
                k: {
                    "init_loss": s.init_loss,
                    "best_loss": s.best_loss,
                    "steps": s.steps,
                    "seconds": s.seconds,
                    "history": s.history,
                }
                for k, s in res.slices.items()
            },
        }

    def global_baseline(self, ratio: float, reference: dict, fraction: float = 1.0) -> dict:
        """Tensorize exactly the layers the slice-wise run did, then fine-tune within its time (same clock)."""
        budget = self.spent(reference)
        clock = time.process_time if self.args.clock == "cpu" else time.perf_counter
        la = load()
        t0, w0 = clock(), time.perf_counter()
        student = copy.deepcopy(self.teacher)
        torch.manual_seed(self.args.seed)
        rules = {layer_rule_pattern(n): {"ratio": ratio} for n in reference["layers"]}
        report = tnkernels.tensorize(student, rules=rules)
        t_tensorize = clock() - t0
        acc0 = evaluate(student, self.test_loader)
        g = torch.Generator().manual_seed(self.args.seed)
        data = calibration_subset(self.train_ds, fraction, seed=self.args.seed)  # the slice-wise run's images
        loader = DataLoader(data, batch_size=self.args.global_batch, shuffle=True, generator=g, drop_last=True)
        remaining = max(budget - t_tensorize, 1.0)
        out = global_finetune(
            student,
            loader,
            teacher=self.teacher if self.args.global_kd > 0 else None,
            kd_weight=self.args.global_kd,
            time_budget_s=remaining,
            lr=self.args.global_lr,
            progress=self.progress,
            clock=clock,
        )
        wall = time.perf_counter() - w0
        acc = evaluate(student, self.test_loader)
        return {
            "name": f"global {ratio:g}x" + ("" if fraction >= 1.0 else f", {fraction:.0%} calib"),
            "method": "global",
            "series": "global" if fraction >= 1.0 else None,
            "ratio": ratio,
            "calib_images": len(data),
            "workers": 1,
            "accuracy": acc,
            "accuracy_before_finetune": acc0,
            "achieved_ratio": report.ratio,
            "seconds": wall,  # includes the untimed evaluation before the fine-tune
            "cpu_seconds" if self.args.clock == "cpu" else "charged_seconds": t_tensorize + out["seconds"],
            "budget_s": budget,
            "budget_clock": self.args.clock,
            "tensorize_s": t_tensorize,
            "finetune_s": out["seconds"],
            "steps": out["steps"],
            "history": out["history"],
            "load_before": la,
            "load_after": load(),
            "detail": f"{out['steps']} steps ({out['steps'] / len(loader):.2f} epochs), {acc0:.4f} before fine-tune",
        }

    def run(self) -> None:
        a = self.args
        torch.set_num_threads(a.threads)
        self.results["meta"]["torch_threads"] = torch.get_num_threads()
        phases = set(a.phases.split(","))
        other = "parallel" if a.mode == "sequential" else "sequential"
        if self.work is None:
            self.work = Path(tempfile.mkdtemp(prefix="distill_resnet_"))
        self.setup()
        main: dict[float, dict] = {}
        par1: dict | None = None  # a 1-worker parallel run at the first ratio, the reference of the speed-up
        for r in a.ratios:
            if phases & {"slice", "global"}:
                run = self.slicewise(f"slice-wise {r:g}x", r, a.calib_fraction, 1, f"slice-wise ({a.mode})")
                main[r] = self.add(run)
                if "global" in phases:
                    self.add(self.global_baseline(r, main[r]))
            if "othermode" in phases:
                o = self.add(
                    self.slicewise(f"slice-wise {r:g}x", r, a.calib_fraction, 1, f"slice-wise ({other})", mode=other)
                )
                if other == "parallel" and r == a.ratios[0]:
                    par1 = o
            self.plots()
        if a.mode == "parallel" and a.ratios[0] in main:
            par1 = main[a.ratios[0]]
        small = None
        if "calib10" in phases:
            small = self.add(
                self.slicewise(
                    f"slice-wise {a.ratios[0]:g}x, {a.small_fraction:.0%} calib",
                    a.ratios[0],
                    a.small_fraction,
                    1,
                )
            )
        if "global10" in phases:
            if small is None:
                small = self.reference_row(f"slice-wise {a.ratios[0]:g}x, {a.small_fraction:.0%} calib")
            self.add(self.global_baseline(a.ratios[0], small, a.small_fraction))
        if "speedup" in phases:
            if par1 is None:
                par1 = self.add(
                    self.slicewise(f"slice-wise {a.ratios[0]:g}x", a.ratios[0], a.calib_fraction, 1, mode="parallel")
                )
            n = self.add(
                self.slicewise(
                    f"slice-wise {a.ratios[0]:g}x, {a.workers} workers",
                    a.ratios[0],
                    a.calib_fraction,
                    a.workers,
                    mode="parallel",
                )
            )
            self.results["speedup"] = {
                "workers": a.workers,
                "train_s_1": par1["timings"]["train_s"],
                "train_s_n": n["timings"]["train_s"],
                "train_speedup": par1["timings"]["train_s"] / n["timings"]["train_s"],
                "total_s_1": par1["seconds"],
                "total_s_n": n["seconds"],
                "steps_1": sum(s["steps"] for s in par1["slices"].values()),
                "steps_n": sum(s["steps"] for s in n["slices"].values()),
                "load_1": [par1["load_before"], par1["load_after"]],
                "load_n": [n["load_before"], n["load_after"]],
            }
            self.save()
        self.plots()
        print(self.markdown())
        print(f"[bench] wrote {self.json_path} and {self.md_path}")

    def plots(self) -> None:
        series: dict[str, dict[float, float]] = {}
        for r in self.results["runs"]:
            if r.get("series"):
                series.setdefault(r["series"], {})[r["achieved_ratio"]] = r["accuracy"]
        if series:
            plot_accuracy_vs_ratio(
                series,
                self.out / f"distill_resnet_{self.args.tag}_accuracy.png",
                teacher_accuracy=self.results["teacher"]["accuracy"],
                title=f"{self.model_name()} on digits: slice-wise (no fine-tune) vs global, equal time",
            )
        first = next((r for r in self.results["runs"] if r["method"] == "slice-wise"), None)
        if first:
            hist = {
                k: [{"step": h["step"], "loss": h["val_loss"]} for h in v["history"]]
                for k, v in first["slices"].items()
            }
            plot_slice_losses(
                hist,
                self.out / f"distill_resnet_{self.args.tag}_slice_losses.png",
                title=f"{first['name']}: held-out slice loss (MSE / var)",
            )


def render(path: str, args: argparse.Namespace) -> None:
    """Rebuild the markdown and plots of a finished (or interrupted) run from its JSON."""
    import json

    src = Path(path)
    bench = Bench(args)
    bench.results = json.loads(src.read_text())
    bench.json_path, bench.md_path = src, src.with_suffix(".md")
    bench.out, bench.args.tag = src.parent, src.stem.removeprefix("distill_resnet_")
    bench.save()
    bench.plots()
    print(bench.markdown())


def merge(paths: list[str], args: argparse.Namespace) -> None:
    """One results file from several runs of this script (e.g. phases run side by side as separate processes,
    which is fair with --clock cpu: each process is charged only its own CPU time)."""
    import json

    parts = [json.loads(Path(p).read_text()) for p in paths]
    bench = Bench(args)
    bench.results = parts[0]
    bench.results["meta"]["merged_from"] = [
        {"file": Path(p).name, "command": part["meta"]["command"], "date_utc": part["meta"]["date_utc"]}
        for p, part in zip(paths, parts)
    ]
    bench.results["meta"]["command"] = " + ".join(part["meta"]["command"] for part in parts)
    for part in parts:
        if part.get("teacher", {}).get("accuracy") != parts[0].get("teacher", {}).get("accuracy"):
            raise ValueError(f"--merge: {paths} were measured with different teachers")
    bench.results["runs"] = [r for part in parts for r in part["runs"]]
    for part in parts:
        if "speedup" in part:
            bench.results["speedup"] = part["speedup"]
    bench.save()
    bench.plots()
    print(bench.markdown())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        merge(args.merge, args)
    elif args.render:
        render(args.render, args)
    else:
        Bench(args).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

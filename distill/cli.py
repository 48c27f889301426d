"""`tnk compress`, `tnk eval`, `tnk sensitivity` (registered through the `tnk.commands` entry point).

`tnk compress` with no arguments runs the embedded default end to end: a torchvision ResNet-34 trained on
scikit-learn's digits (on first use, then cached), slice-wise distillation at 2x, and the outputs in distill_out/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from . import cli_flags, cli_report
from .cli_flags import HF_GROUP, RESNET_GROUP

__all__ = ["register", "cmd_compress", "cmd_eval", "cmd_sensitivity"]

DEFAULT_RATIO = 2.0
# Defaults sized so that `tnk compress` (teacher training included) stays within 10 minutes on 2 CPU cores.
# Sequential mode by default: measured on ResNet-34 / digits at 2x with 200 steps per slice, it kept the
# student within 1 point of the teacher where parallel mode fell further behind (docs/distill.md).
DEFAULT_STEPS = 200
DEFAULT_BATCH = 64
DEFAULT_LR = 1e-3


def _is_hf_dir(model: str | None) -> bool:
    return model is not None and (Path(model).expanduser() / "config.json").is_file()


def _common(p: argparse.ArgumentParser, *, hf: bool = True) -> argparse._ArgumentGroup:
    """The flags of every command; returns the group of the ResNet-only flags (the whole parser without HF)."""
    models = "resnet34 (default) or resnet18" + (", or a Hugging Face folder holding config.json" if hf else "")
    p.add_argument("--model", default=None, help=models)
    r = p.add_argument_group(RESNET_GROUP) if hf else p
    r.add_argument("--weights", default=None, help="teacher checkpoint (default: train on first use and cache)")
    r.add_argument(
        "--data",
        default="digits",
        help="'digits' (embedded), a CIFAR-10 folder, or an ImageFolder root with train/ and test/",
    )
    r.add_argument("--image-size", type=int, default=32, help="images are resized to this square size")
    r.add_argument(
        "--teacher-epochs", type=int, default=None, help="epochs when the teacher is trained here (default 8)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the data split, the teacher's training and the students")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return r


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add compress, eval and sensitivity to the `tnk` parser."""
    p = subparsers.add_parser(
        "compress",
        help="slice-wise distillation into a tensorized student",
        description=cli_flags.COMPRESS_DESCRIPTION,
        epilog=cli_flags.COMPRESS_EPILOG,
        formatter_class=cli_flags.HelpFormatter,
    )
    r = _common(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--ratio", type=float, default=None, help=f"compression ratio of the sliced layers (default {DEFAULT_RATIO})"
    )
    g.add_argument(
        "--budget", default=None, help="ResNet only: per-layer budget JSON from `tnk sensitivity --target-ratio`"
    )
    r.add_argument(
        "--slices",
        nargs="+",
        default=["per-block"],
        help="per-block | per-conv | per-stage, or module names (a+b groups consecutive modules)",
    )
    p.add_argument(
        "--mode",
        choices=("parallel", "sequential"),
        default=None,
        help="sequential: each slice learns from the already trained student's upstream outputs (default on one "
        "process); parallel: from the teacher's inputs, slices independent (default with --workers > 1 or "
        "under torchrun)",
    )
    r.add_argument("--workers", type=int, default=1, help="worker processes for parallel mode")
    p.add_argument("--out", default="distill_out", help="output folder")
    r.add_argument("--calib-fraction", type=float, default=1.0, help="share of the training images used")
    r.add_argument(
        "--global-baseline",
        action="store_true",
        help="also fine-tune the same tensorization end to end within the same wall-clock time",
    )
    r.add_argument("--kd-weight", type=float, default=0.0, help="logit distillation weight for the baseline")
    p.add_argument(
        "--steps", type=int, default=None, help=f"max training steps per slice (default {DEFAULT_STEPS}; HF: 100)"
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"training batch (default {DEFAULT_BATCH}; HF: 8)")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR:g}; HF: 3e-4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default cpu; HF: LOCAL_RANK's GPU if any, else cpu)")
    r.add_argument(
        "--memory-budget-mb",
        type=float,
        default=None,
        help="spill captured features to OUT/features shards beyond this many MB",
    )
    r.add_argument("--sensitivity", default=None, help="a sensitivity JSON to plot as a heat map in OUT")
    try:  # Hugging Face flags (--fp16-features, --max-seconds-per-slice, ...), owned by distill.hf
        from .hf.pipeline import add_arguments

        add_arguments(p.add_argument_group(HF_GROUP), core=False, shared=p)
    except ImportError:
        p.add_argument("--fp16-features", action="store_true", help="store captured activations in float16")
        p.add_argument("--max-seconds-per-slice", type=float, default=None, help="wall-clock cap per slice")
    cli_flags.record_defaults(p)
    p.set_defaults(func=cmd_compress)

    e = subparsers.add_parser(
        "eval",
        help="test accuracy of a teacher or of a compressed student (Hugging Face: perplexity or embedding agreement)",
        description=cli_flags.EVAL_DESCRIPTION,
        epilog=cli_flags.EVAL_EPILOG,
        formatter_class=cli_flags.HelpFormatter,
    )
    _common(e)
    e.add_argument("--compressed", default=None, help="a save_compressed folder, e.g. distill_out/compressed")
    h = e.add_argument_group(HF_GROUP)
    h.add_argument("--text", default=None, help="held-out text from this file (default: the embedded corpus)")
    h.add_argument("--seq-len", type=int, default=128, help="tokens per held-out sequence")
    e.add_argument("--device", default=None, help="cpu (default) or cuda")
    cli_flags.record_defaults(e)
    e.set_defaults(func=cmd_eval)

    s = subparsers.add_parser(
        "sensitivity",
        help="per-layer sensitivity scan and rank budget (torchvision ResNets)",
        description=cli_flags.SENSITIVITY_DESCRIPTION,
        epilog=cli_flags.SENSITIVITY_EPILOG,
        formatter_class=cli_flags.HelpFormatter,
    )
    _common(s, hf=False)
    s.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="ratios each layer is scanned at")
    s.add_argument("--layers", nargs="+", default=None, help="layer names (default: every conv in the stages)")
    s.add_argument(
        "--metric",
        choices=("error", "accuracy"),
        default="error",
        help="error: relative logit error against the teacher on calibration images; accuracy: accuracy on them",
    )
    s.add_argument(
        "--calib-fraction", type=float, default=0.2, help="share of the training images the layers are scored on"
    )
    s.add_argument("--target-ratio", type=float, default=None, help="also allocate a budget for this ratio")
    s.add_argument("--out", default="distill_out", help="writes OUT/sensitivity.json, .png and budget.json")
    s.add_argument("--device", default=None, help="cpu (default) or cuda")
    s.set_defaults(func=cmd_sensitivity)


def _setup(args) -> str:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


def _teacher(args, device, datasets, info: dict | None = None):
    from .teacher import DEFAULT_EPOCHS, get_teacher

    return get_teacher(
        args.model or "resnet34",
        args.weights,
        args.data,
        device,
        image_size=args.image_size,
        epochs=args.teacher_epochs or DEFAULT_EPOCHS,
        seed=args.seed,
        progress=args.progress,
        datasets=datasets,
        info=info,
    )


def _init_distributed(device: str) -> tuple[int, str]:
    """Under torchrun (WORLD_SIZE > 1), join the process group: gloo on CPU, nccl on GPUs (one per local rank)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), device


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def cmd_compress(args) -> int:
    try:
        return _compress(args)
    except KeyboardInterrupt:
        if getattr(args, "progress", True):
            print(file=sys.stderr)  # "interrupted" then starts a line of its own, not the progress bar's
        raise


def _compress(args) -> int:
    from .arg_checks import check_compress_args
    from .out_dir import check_kind, check_out, claim_resnet, clean_stale_tmp

    check_compress_args(args)
    hf = _is_hf_dir(args.model)
    cli_flags.check_pipeline_flags(args, hf=hf)
    if hf:
        from .hf.pipeline import compress_hf

        if args.ratio is None:
            args.ratio = DEFAULT_RATIO
        compress_hf(args)
        return 0
    check_out(args.out)
    check_kind(args.out, "resnet")
    import copy

    import torch
    from torch.utils.data import DataLoader

    import tnkernels

    from .data import calibration_subset, load_data
    from .ratio_check import check_ratio_on_meta, sliced_weight_counts
    from .runner import distill, tensorized_copy
    from .slices import make_slices
    from .teacher import build_model, evaluate
    from .train_slice import SliceTrainConfig

    device = _setup(args)
    # Slice names and the ratio's reach are checked on the architecture built on the meta device (no weights):
    # a typo or an unreachable ratio must not wait for the teacher's training.
    with torch.device("meta"):
        meta = build_model(args.model or "resnet34")
        check_ratio_on_meta(meta, make_slices(meta, args.slices), None if args.budget else args.ratio or DEFAULT_RATIO)
    out = Path(args.out)
    claim_resnet(out)
    if int(os.environ.get("RANK", "0")) == 0:
        clean_stale_tmp(out)  # a save_compressed killed in an earlier run
    times: dict[str, float] = {}
    t = time.perf_counter()
    train_ds, test_ds = load_data(args.data, image_size=args.image_size)
    calib_ds = calibration_subset(train_ds, args.calib_fraction, args.seed)
    rules = None
    if args.budget is not None:
        from .budget import load_budget

        if not Path(args.budget).is_file():
            raise ValueError(
                f"--budget: {args.budget!r} does not exist; write one with `tnk sensitivity --target-ratio R`"
            )
        rules = load_budget(args.budget)
    ratio = None if rules is not None else (args.ratio if args.ratio is not None else DEFAULT_RATIO)
    times["data_s"] = time.perf_counter() - t

    rank, device = _init_distributed(device)
    if args.mode is None:  # slices can only be spread over workers or ranks when they are independent
        parallel = args.workers > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
        args.mode = "parallel" if parallel else "sequential"
    t = time.perf_counter()
    if rank > 0:  # under torchrun, rank 0 trains (or loads) the teacher first; the others then read its cache
        _barrier()
    teacher = _teacher(args, device, (train_ds, test_ds))
    if rank == 0:
        _barrier()
    times["teacher_s"] = time.perf_counter() - t
    test_loader = DataLoader(test_ds, batch_size=256)
    t = time.perf_counter()
    teacher_acc = evaluate(teacher, test_loader, device)
    times["eval_teacher_s"] = time.perf_counter() - t

    config = SliceTrainConfig(
        max_steps=DEFAULT_STEPS if args.steps is None else args.steps,
        batch_size=args.batch_size or DEFAULT_BATCH,
        lr=args.lr or DEFAULT_LR,
        seed=args.seed,
        device=device,
        time_budget_s=getattr(args, "max_seconds_per_slice", None),
    )
    calib_loader = DataLoader(calib_ds, batch_size=32, shuffle=False)
    fp16 = bool(getattr(args, "fp16_features", False))
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)
    run_key = f"{args.data}|{args.image_size}|{args.calib_fraction}|{args.seed}"
    res = distill(
        teacher,
        calib_loader,
        slices=args.slices,
        ratio=ratio,
        rules=rules,
        mode=args.mode,
        workers=args.workers,
        out_dir=out,
        config=config,
        fp16=fp16,
        memory_budget_bytes=budget,
        device=device,
        progress=args.progress,
        run_key=run_key,
    )
    if res.student is None:  # a torch.distributed rank other than 0: rank 0 writes the outputs
        return 0
    student = res.student
    t = time.perf_counter()
    student_acc = evaluate(student, test_loader, device)
    times["eval_student_s"] = time.perf_counter() - t
    before, after, left_dense = sliced_weight_counts(teacher, student, res.specs)  # dense layers count at 1x
    t = time.perf_counter()
    tnkernels.save_compressed(student, out / "compressed")
    times["save_s"] = time.perf_counter() - t
    slicewise_s = sum(v for k, v in res.timings.items() if k in ("tensorize_s", "capture_s", "train_s"))

    report = {
        "model": args.model or "resnet34",
        "data": args.data,
        "calib_fraction": args.calib_fraction,
        "calib_images": len(calib_ds),
        "test_images": len(test_ds),
        "mode": args.mode,
        "workers": args.workers,
        "slices": args.slices,
        "ratio_requested": ratio,
        "budget": args.budget,
        "ratio": before / after if after else 1.0,
        "params_compressed_layers": [before, after],
        "layers_left_dense": left_dense,
        "params_model": [sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters())],
        "teacher_accuracy": teacher_acc,
        "student_accuracy": student_acc,
        "slicewise_seconds": slicewise_s,
        "trained_slices": res.trained,
        "resumed_slices": res.resumed,
        "times": {**times, **{f"distill_{k}": v for k, v in res.timings.items()}},
        "slices_detail": {k: v.to_dict() for k, v in res.slices.items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    if args.global_baseline:
        from .global_baseline import global_finetune

        g_student = tensorized_copy(teacher, res.specs, ratio=ratio, rules=rules, seed=args.seed)
        g_loader = DataLoader(
            calib_ds,
            batch_size=args.batch_size or DEFAULT_BATCH,
            shuffle=True,
            generator=torch.Generator().manual_seed(args.seed),
        )
        t = time.perf_counter()
        g = global_finetune(
            g_student,
            g_loader,
            teacher=copy.deepcopy(teacher) if args.kd_weight else None,
            kd_weight=args.kd_weight,
            time_budget_s=slicewise_s,
            device=device,
            progress=args.progress,
        )
        report["times"]["global_s"] = time.perf_counter() - t
        report["global_accuracy"] = evaluate(g_student, test_loader, device)
        report["global_seconds"] = g.get("seconds")
        report["global_history"] = g.get("history")
    cli_report.write_plots(report, res, out, args)
    _write_json(out / "report.json", report)
    print(cli_report.summary(report, out))
    return 0


def cmd_eval(args) -> int:
    from torch.utils.data import DataLoader

    import tnkernels

    from .data import load_data, num_classes_of
    from .teacher import build_model, evaluate, load_weights

    cli_flags.check_pipeline_flags(args, hf=_is_hf_dir(args.model))
    device = _setup(args)
    if _is_hf_dir(args.model):  # the metrics tnk compress reports for Hugging Face models (distill/hf/eval_cmd.py)
        from .hf.eval_cmd import print_hf_eval

        return print_hf_eval(args)
    train_ds, test_ds = load_data(args.data, image_size=args.image_size)
    loader = DataLoader(test_ds, batch_size=256)
    name = args.model or "resnet34"
    if args.compressed is not None:
        path = Path(args.compressed)
        if not path.is_dir():
            raise ValueError(f"--compressed: {str(path)!r} is not a folder; pass OUT/compressed from tnk compress")
        model = tnkernels.load_compressed(build_model(name, num_classes_of(train_ds)), path)
        what = f"student {path}"
    elif args.weights is not None:
        model = load_weights(build_model(name, num_classes_of(train_ds)), args.weights, model_name=name)
        what = f"teacher {args.weights}"
    else:
        info: dict = {}
        model = _teacher(args, device, (train_ds, test_ds), info)
        what = f"teacher {name} ({'cached' if info.get('source') == 'cache' else 'trained now and cached'})"
    acc = evaluate(model.to(device), loader, device)
    print(f"{what}: test accuracy {acc:.4f} on {len(test_ds)} images")
    return 0


def cmd_sensitivity(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    from .data import calibration_subset, load_data
    from .out_dir import check_out
    from .sensitivity import sensitivity_scan
    from .slices import resnet_slices

    cli_flags.check_sensitivity_model(args.model, hf=_is_hf_dir(args.model))
    check_out(args.out)
    device = _setup(args)
    train_ds, test_ds = load_data(args.data, image_size=args.image_size)
    teacher = _teacher(args, device, (train_ds, test_ds))
    layers = args.layers or [s.name for s in resnet_slices(teacher, "per-conv")]
    calib = DataLoader(calibration_subset(train_ds, args.calib_fraction, args.seed), batch_size=256)
    batches = [x for x, _ in calib]
    labels = [y for _, y in calib]
    with torch.no_grad():
        ref = [teacher(x.to(device)) for x in batches]

    @torch.no_grad()
    def eval_fn(model) -> float:
        model.eval()
        if args.metric == "accuracy":
            hits = sum(int((model(x.to(device)).argmax(-1).cpu() == y).sum()) for x, y in zip(batches, labels))
            return hits / sum(len(y) for y in labels)
        num = sum(float((model(x.to(device)) - r).pow(2).sum()) for x, r in zip(batches, ref))
        den = sum(float(r.pow(2).sum()) for r in ref)
        return (num / den) ** 0.5

    table = sensitivity_scan(
        teacher,
        layers,
        args.ratios,
        eval_fn,
        progress=args.progress,
        higher_is_better=args.metric == "accuracy",
        metric=args.metric,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_json(out / "sensitivity.json")
    from . import plots

    plots.plot_sensitivity(table, out / "sensitivity.png")
    print(
        f"sensitivity of {len(layers)} layers at ratios {args.ratios}: {out / 'sensitivity.json'}, "
        f"{out / 'sensitivity.png'}"
    )
    if args.target_ratio is not None:
        from .budget import allocate_ratios, save_budget

        alloc = allocate_ratios(table, args.target_ratio)
        save_budget(out / "budget.json", alloc, {"target_ratio": args.target_ratio, "metric": args.metric})
        print(
            f"budget for {args.target_ratio:g}x: {out / 'budget.json'} (use: tnk compress --budget "
            f"{out / 'budget.json'})"
        )
    return 0

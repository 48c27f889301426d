"""`tnk compress` on a torchvision ResNet: teacher (trained on first use, then cached), slice-wise distillation,
evaluation, the saved student, report.json and plots; optionally the global fine-tune baseline.

distill/cli.py checks the flags and dispatches here (Hugging Face folders go to distill/hf/pipeline.py); `tnk eval`
and `tnk sensitivity` share the device setup and the teacher loading below.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path

from . import cli_report
from ._atomic import atomic_write_text
from .torchrun import dist_env, rank_device

DEFAULT_RATIO = 2.0
# Defaults sized so that `tnk compress` (teacher training included) stays within 10 minutes on 2 CPU cores.
# Sequential mode by default: measured on ResNet-34 / digits at 2x with 200 steps per slice, it kept the
# student within 1 point of the teacher where parallel mode fell further behind (docs/distill.md).
DEFAULT_STEPS = 200
DEFAULT_BATCH = 64
DEFAULT_LR = 1e-3


def setup_device(args) -> str:
    import torch

    from .arg_checks import check_compress_args

    check_compress_args(args)  # tnk eval / sensitivity too (--threads, --device): before the model is loaded
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args.device or "cpu"


def teacher_from_args(args, device, datasets, info: dict | None = None):
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

    if dist_env()[1] <= 1:
        return 0, device
    device = rank_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Ranks wait at collectives for as long as rank 0 trains the teacher (first run) and the slowest rank
        # trains its slices: the default timeout (10 min with nccl) would abort a long run, so it is the Hugging
        # Face pipeline's wait (24 h). A crashed rank still ends the job at once: torchrun stops the others.
        import datetime

        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), device


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def compress_resnet(args) -> int:
    """The ResNet pipeline of `tnk compress`, flags already checked (distill.cli)."""
    from .out_dir import check_kind, check_out, claim_resnet, clean_stale_tmp

    check_out(args.out)
    check_kind(args.out, "resnet")
    import torch
    from torch.utils.data import DataLoader

    import tnkernels

    from .data import calibration_subset, load_data
    from .ratio_check import check_ratio_on_meta, sliced_weight_counts
    from .runner import distill
    from .slices import make_slices
    from .teacher import build_model, evaluate
    from .train_slice import SliceTrainConfig

    device = setup_device(args)
    # Slice names and the ratio's reach are checked on the architecture built on the meta device (no weights):
    # a typo or an unreachable ratio must not wait for the teacher's training.
    with torch.device("meta"):
        meta = build_model(args.model or "resnet34")
        check_ratio_on_meta(meta, make_slices(meta, args.slices), None if args.budget else args.ratio or DEFAULT_RATIO)
    out = Path(args.out)
    claim_resnet(out)
    if dist_env()[0] == 0:
        clean_stale_tmp(out)  # a save_compressed killed in an earlier run
    times: dict[str, float] = {}
    t = time.perf_counter()
    train_ds, test_ds = load_data(args.data, image_size=args.image_size)
    calib_ds = calibration_subset(train_ds, args.calib_fraction, args.seed)
    rules = _budget_rules(args.budget)
    ratio = None if rules is not None else (args.ratio if args.ratio is not None else DEFAULT_RATIO)
    times["data_s"] = time.perf_counter() - t

    rank, device = _init_distributed(device)
    if args.mode is None:  # slices can only be spread over workers or ranks when they are independent
        parallel = args.workers > 1 or dist_env()[1] > 1
        args.mode = "parallel" if parallel else "sequential"
    t = time.perf_counter()
    if rank > 0:  # under torchrun, rank 0 trains (or loads) the teacher first; the others then read its cache
        _barrier()
    teacher = teacher_from_args(args, device, (train_ds, test_ds))
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
        **_settings(args, ratio, len(calib_ds), len(test_ds)),
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
        "machine": _machine(),
    }
    if args.global_baseline:
        entries, report["times"]["global_s"] = _global_baseline(
            args, teacher, res.specs, (ratio, rules), calib_ds, (test_loader, device), slicewise_s
        )
        report.update(entries)
    cli_report.write_plots(report, res, out, args)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    print(cli_report.summary(report, out))
    return 0


def _budget_rules(budget: str | None) -> dict | None:
    """The per-layer rules of a `tnk sensitivity --target-ratio` budget file, or None without --budget."""
    if budget is None:
        return None
    from .budget import load_budget

    if not Path(budget).is_file():
        raise ValueError(f"--budget: {budget!r} does not exist; write one with `tnk sensitivity --target-ratio R`")
    return load_budget(budget)


def _settings(args, ratio: float | None, calib_images: int, test_images: int) -> dict:
    return {
        "model": args.model or "resnet34",
        "data": args.data,
        "calib_fraction": args.calib_fraction,
        "calib_images": calib_images,
        "test_images": test_images,
        "mode": args.mode,
        "workers": args.workers,
        "slices": args.slices,
        "ratio_requested": ratio,
        "budget": args.budget,
    }


def _machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _global_baseline(args, teacher, specs, ratio_rules, calib_ds, test_on, slicewise_s: float) -> tuple[dict, float]:
    """The baseline the paper compares against: the same tensorized start, fine-tuned end to end on the calibration
    images for as long as the slice-wise run took. Returns its report entries and the fine-tune's seconds."""
    import torch
    from torch.utils.data import DataLoader

    from .global_baseline import global_finetune
    from .runner import tensorized_copy
    from .teacher import evaluate

    (ratio, rules), (test_loader, device) = ratio_rules, test_on
    g_student = tensorized_copy(teacher, specs, ratio=ratio, rules=rules, seed=args.seed)
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
    seconds = time.perf_counter() - t
    entries = {
        "global_accuracy": evaluate(g_student, test_loader, device),
        "global_seconds": g.get("seconds"),
        "global_history": g.get("history"),
    }
    return entries, seconds

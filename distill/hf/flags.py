"""The Hugging Face pipeline's flags and their defaults (``tnk compress --model DIR``, ``python -m
distill.hf.pipeline``); ``option(args, name)`` reads a flag with its default."""

from __future__ import annotations

import argparse

from .presets import PRESETS
from .train import INITS

DEFAULTS = {
    "preset": None,  # per family: presets.DEFAULT_PRESET (block for BERT, mlp for GPT-2 and Llama)
    "attention": False,
    "text": None,
    "tokenizer": None,
    "head": False,
    # the head slice's lr: on the bench GPT-2 within 1% of the best held-out KL at ratios 2 and 4 and 6% at 8
    # (bench/results/head_lr/head_lr.log), where the blocks' 3e-4 was 17% worse
    "head_lr": 1e-3,
    "seq_len": 128,
    "num_samples": 256,
    "batch_size": 8,
    "steps": 100,
    "lr": 3e-4,
    "group_size": 2,
    "layers": None,
    "fp16_features": False,
    "device": None,
    "num_cores": None,
    "init": "whitened",
    "sequential": True,  # on one process (measured on MiniLM 2x: 0.916 vs 0.902 cosine); torchrun: parallel
    "max_seconds_per_slice": None,
    "eval": True,
    "progress": True,
    "wait_timeout": 24 * 3600.0,
}


def add_arguments(p: argparse.ArgumentParser, *, core: bool = True, shared=None) -> None:
    """The HF pipeline's flags. ``core=False`` skips the ones ``tnk compress`` already defines; ``shared`` (default
    ``p``) receives the flags the ResNet path takes too (--fp16-features, --max-seconds-per-slice)."""
    shared = p if shared is None else shared
    if core:
        p.add_argument("--model", required=True, help="local Hugging Face model folder (holds config.json)")
        p.add_argument("--ratio", type=float, required=True, help="compression ratio of the tensorized layers")
        p.add_argument("--out", required=True, help="output folder (compressed/, report.json, slices/)")
        p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps per slice")
        p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
        p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
        p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: LOCAL_RANK's GPU or cpu)")
        p.add_argument(
            "--mode",
            choices=("parallel", "sequential"),
            default=None,
            help="sequential: slice k trains on the inputs the already compressed slices produce (default "
            "on one process); parallel: on the teacher's inputs (default and required under torchrun)",
        )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=DEFAULTS["preset"],
        help="slice granularity (default: block for the encoders, mlp for GPT-2 and Llama; measured best for BERT "
        "and GPT-2)",
    )
    p.add_argument("--attention", action="store_true", help="also tensorize attention projections")
    p.add_argument(
        "--head",
        action="store_true",
        help="GPT-2: also tensorize lm_head as a last slice, untied from the input embedding (distill/hf/head.py); "
        "OUT/compressed then holds the whole LM: load it into AutoModelForCausalLM",
    )
    p.add_argument(
        "--head-lr", type=float, default=DEFAULTS["head_lr"], help="learning rate of the --head slice (default: 1e-3)"
    )
    p.add_argument("--text", default=None, help="calibration text: plain text or .jsonl with a 'text' field")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="folder of a saved tokenizer, for a model folder saved without one (default: the model folder's)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULTS["seq_len"],
        help=f"tokens per calibration sequence (default: {DEFAULTS['seq_len']}; BERT sentences are padded to it)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULTS["num_samples"],
        help="calibration sequences (GPT-2 blocks / BERT sentences)",
    )
    p.add_argument("--group-size", type=int, default=DEFAULTS["group_size"], help="blocks per slice for --preset group")
    p.add_argument("--layers", default=None, help="comma-separated block indices to compress (default: all)")
    shared.add_argument("--fp16-features", action="store_true", help="store captured activations in float16")
    p.add_argument("--num-cores", type=int, default=None, help="MPO cores per layer with --init plain (default: auto)")
    p.add_argument(
        "--init",
        choices=INITS,
        default=DEFAULTS["init"],
        help="whitened: low-rank factors fitted to the captured activations (default, the measured best); "
        "plain: TT-SVD of each weight",
    )
    shared.add_argument(
        "--max-seconds-per-slice",
        type=float,
        default=None,
        help="stop a slice's training after this many seconds (default: no limit, only --steps)",
    )
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip teacher-vs-student metrics")


def option(args, name):
    """The flag's value, or its default when the caller's namespace (tnk compress, tests, the Python API) lacks it
    or left it None."""
    value = getattr(args, name, None)
    return DEFAULTS[name] if value is None else value

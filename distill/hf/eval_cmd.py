"""`tnk eval --model HF_DIR --compressed OUT/compressed`: a compressed Hugging Face model against its teacher.

The same metrics `tnk compress` writes to report.json, on the same held-out split of the calibration text
(perplexity for decoders; sentence-embedding cosine and retrieval agreement for encoders), so a checkpoint can be
checked again later, on another machine, or against other text (`--text`).
"""

from __future__ import annotations

import json
import os

import torch

import tnkernels

from .flags import DEFAULTS
from .models import check_seq_len, family_of, load_hf_model
from .pipeline import calibration_data, compare, prepare_run, teacher_metrics


def eval_hf(
    model_dir: str | os.PathLike,
    compressed: str | os.PathLike,
    *,
    text_path: str | None = None,
    seq_len: int = DEFAULTS["seq_len"],
    device=None,
) -> dict:
    """Teacher and student metrics on the held-out text: the teacher is `model_dir`, the student the same model
    with `compressed` (a save_compressed folder) loaded into it; both run on `device` (default cpu)."""
    device = torch.device(device or "cpu")  # `tnk eval --device cuda` was ignored before 2026-12-02
    model, tokenizer = load_hf_model(model_dir)
    model.to(device)
    _, held = calibration_data(
        family_of(model), tokenizer, text_path=text_path, seq_len=seq_len, num_samples=1, batch_size=1
    )
    teacher = teacher_metrics(model, held)
    student = tnkernels.load_compressed(model, compressed)  # in place: the teacher's numbers are taken first
    student.to(device)  # (load_compressed builds its layers on the model's device; this keeps it so)
    return compare(student, held, teacher)


def print_hf_eval(args) -> int:
    """The `tnk eval` command for a Hugging Face folder: print the metrics as JSON."""
    if args.compressed is None:
        raise ValueError("--compressed: give the OUT/compressed folder of a `tnk compress --model DIR` run")
    prepare_run(args)
    check_seq_len(args.model, getattr(args, "seq_len", None))
    metrics = eval_hf(
        args.model,
        args.compressed,
        text_path=getattr(args, "text", None),
        seq_len=getattr(args, "seq_len", None) or DEFAULTS["seq_len"],
        device=getattr(args, "device", None),
    )
    print(json.dumps(metrics, indent=2))
    return 0

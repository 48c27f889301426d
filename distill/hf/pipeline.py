"""Slice-wise compression of a Hugging Face GPT-2 / BERT / Llama: ``tnk compress --model DIR --ratio R --out OUT``.

Steps (each rank of a ``torchrun`` job does its share; a single process is rank 0 of 1):

1. Calibration text (``--text`` or the embedded corpus) is tokenized: packed ``--seq-len`` blocks for GPT-2,
   padded sentences for BERT. Every 5th text is held out for evaluation.
2. The rank's slices (a contiguous share of the preset's slices) get their teacher features captured block by
   block to ``OUT/features/rank<r>/`` (``capture.py``: activations on disk, memory bounded by one block).
3. Each slice is deep-copied, tensorized at ``--ratio`` (attention projections stay dense unless
   ``--attention``; by default as activation-whitened low-rank factors fitted to the captured inputs,
   ``whiten.py``), trained alone (``train.py``) and checkpointed atomically to ``OUT/slices/<name>.pt``;
   finished slices are skipped when a killed run is restarted. Sequential mode (the default on one process)
   feeds slice k the inputs the already compressed slices produce, with the teacher's outputs as targets;
   ``--mode parallel`` (and every torchrun job) trains every slice on the teacher's inputs.
4. Rank 0 waits for every slice checkpoint, puts the students into the model, writes ``OUT/compressed``
   (``tnkernels.save_compressed`` of the *base* model, so ``AutoModel.from_pretrained(DIR)`` is the skeleton)
   and ``OUT/report.json`` (per-slice losses and timings, parameter counts, teacher-vs-student metrics).
   With ``--head`` (GPT-2) rank 0 first trains the LM head as a last slice on the compressed blocks' outputs
   (``head.py``) and saves the whole LM instead (skeleton: ``AutoModelForCausalLM.from_pretrained(DIR)``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from itertools import chain
from pathlib import Path

import torch
from torch import nn

import tnkernels
from distill._atomic import atomic_save, atomic_write_text
from distill.arg_checks import check_compress_args
from distill.capture import remove_empty
from distill.fingerprint import claim, digest
from distill.out_dir import check_kind, check_out, clean_stale_tmp
from distill.slices import set_submodule
from distill.torchrun import dist_env, local_rank, rank_device
from tnkernels.decompose import check_ratio

from . import evaluate, text
from .capture import capture_features, load_slice_features
from .flags import DEFAULTS, add_arguments, option
from .head import distill_head, install_head, output_head
from .models import CAUSAL_FAMILIES, base_model, check_model_dir, family_of, load_hf_model, load_tokenizer
from .presets import ATTENTION_PATTERNS, default_preset, resolve, slice_specs
from .train import tensorize_slice, train_slice


def default_device(device: str | None) -> torch.device:
    """The run's device: --device as given (a bare ``cuda`` under torchrun is this rank's GPU: distill/torchrun.py).
    No --device: LOCAL_RANK's GPU if there is one, else the CPU."""
    if device:
        return torch.device(rank_device(str(device)))
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def calibration_data(
    family: str, tokenizer, *, text_path=None, seq_len: int, num_samples: int, batch_size: int
) -> tuple[list[dict], object]:
    """(calibration batches, held-out eval data): token blocks for the decoders, padded sentences for BERT."""
    if tokenizer is None:
        raise ValueError(
            "the model folder has no tokenizer files and calibration text needs the model's tokenizer: pass "
            "--tokenizer DIR (a folder where the family's tokenizer was saved with save_pretrained) or copy its "
            "files into the model folder"
        )
    texts = text.read_texts(text_path)
    if family in CAUSAL_FAMILIES:
        calib_t, held_t = text.split_holdout(texts)
        calib = text.causal_lm_blocks(calib_t, tokenizer, seq_len, max_blocks=num_samples)
        held = text.causal_lm_blocks(held_t, tokenizer, seq_len)
        return text.batches(calib, batch_size), held
    calib_s, held_s = text.split_holdout(text.split_sentences(texts))
    calib = text.encode_sentences(calib_s[:num_samples], tokenizer, seq_len)
    return text.batches(calib, batch_size), text.encode_sentences(held_s, tokenizer, seq_len)


def my_share(items: list, rank: int, world: int) -> list:
    """Contiguous share of ``items`` for ``rank``: early ranks stop capturing after fewer blocks."""
    n = len(items)
    return items[rank * n // world : (rank + 1) * n // world]


def teacher_metrics(model: nn.Module, held) -> dict:
    if family_of(model) in CAUSAL_FAMILIES:
        return {"perplexity": evaluate.perplexity(model, held)}
    return {"embeddings": evaluate.sentence_embeddings(model, held)}


def compare(model: nn.Module, held, teacher: dict) -> dict:
    if "perplexity" in teacher:
        return {
            "teacher_perplexity": teacher["perplexity"],
            "student_perplexity": evaluate.perplexity(model, held),
        }
    return evaluate.embedding_agreement(teacher["embeddings"], evaluate.sentence_embeddings(model, held))


def compress_model(
    model: nn.Module,
    calib: list[dict],
    out: str | os.PathLike,
    *,
    ratio: float,
    preset: str | None = None,
    attention: bool = False,
    group_size: int = 2,
    layers=None,
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    fp16_features: bool = False,
    num_cores: int | None = None,
    init: str = DEFAULTS["init"],
    sequential: bool | None = None,
    max_seconds_per_slice: float | None = None,
    head: bool = False,
    head_lr: float = DEFAULTS["head_lr"],
    held=None,
    device=None,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    wait_timeout: float = DEFAULTS["wait_timeout"],
) -> dict | None:
    """Compress ``model`` (GPT-2, BERT or Llama family; in place on rank 0) slice-wise and write ``out`` (module doc).

    ``preset=None`` takes the family's default (``presets.DEFAULT_PRESET``: block for BERT, mlp for GPT-2).
    Returns the report dict on rank 0, ``None`` on other ranks.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, world={world})")
    check_ratio(ratio, "compress_model: ratio")  # before the model moves or the teacher runs
    if not calib:
        raise ValueError("compress_model: calib has no batches; pass at least one calibration batch (a dict)")
    for name, value in (("lr", lr), ("head_lr", head_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"compress_model: {name} must be a finite number > 0, got {value!r}")
    out = Path(out)
    device = default_device(device) if not isinstance(device, torch.device) else device
    model.to(device).eval()
    base = base_model(model)
    family = family_of(model)
    dense_head = output_head(model) if head else None  # an encoder has none: fail before any work
    preset = preset or default_preset(model)
    specs = slice_specs(model, preset, group_size=group_size, layers=layers)
    if sequential is None:
        sequential = DEFAULTS["sequential"] and world == 1
    if sequential and world != 1:
        raise ValueError(
            f"sequential=True trains slice k on the outputs of the compressed slices before it, so it "
            f"cannot be split over {world} ranks; run it in one process or use --mode parallel"
        )
    # what decides the slices: a rerun in OUT resumes only this run (cached features and slices included)
    settings = {
        "ratio": ratio, "preset": preset, "slices": [[s.name, list(s.modules)] for s in specs],
        "attention": attention, "num_cores": num_cores, "init": init, "steps": steps, "lr": lr,
        "fp16_features": fp16_features, "sequential": sequential, "head": head, "head_lr": head_lr,
    }  # fmt: skip
    calib_tensors = ((f"calib{i}.{k}", v) for i, b in enumerate(calib) for k, v in b.items() if torch.is_tensor(v))
    out.mkdir(parents=True, exist_ok=True)
    claim(out, digest(chain(model.state_dict().items(), calib_tensors), settings), settings)
    (out / "slices").mkdir(parents=True, exist_ok=True)
    ckpt = {s.name: out / "slices" / f"{s.name}.pt" for s in specs}
    teacher = teacher_metrics(model, held) if (held is not None and rank == 0) else None
    # before sequential mode puts students into the model; with the head, its own weight (untied) counts too
    params_before = tnkernels.count_params(base) + (tnkernels.count_params(dense_head) if head else 0)
    mine = [s for s in my_share(specs, rank, world) if not ckpt[s.name].is_file()]

    store = out / "features" / f"rank{rank}"
    t0 = time.perf_counter()
    cap = (
        capture_features(
            model, mine, calib, store, store_dtype=torch.float16 if fp16_features else None, progress=progress
        )
        if mine
        else {}
    )
    capture_s = time.perf_counter() - t0
    if sequential:
        for s in specs:  # a resumed run: slices finished earlier feed the ones still to train
            if ckpt[s.name].is_file():
                _install(base, torch.load(ckpt[s.name], weights_only=False, map_location=device))
    for s in mine:
        data = load_slice_features(store, s.name, device=device)
        if sequential and any(ckpt[p.name].is_file() for p in specs[: specs.index(s)]):
            data = _student_inputs(model, s, calib, out / "features" / "student", data, device, progress)
        student, rep = tensorize_slice(
            resolve(model, s),
            ratio=ratio,
            attention=attention,
            attention_patterns=ATTENTION_PATTERNS[family],
            num_cores=num_cores,
            init=init,
            data=data,
        )
        student.to(device)
        stats = train_slice(s, student, data, steps=steps, lr=lr, max_seconds=max_seconds_per_slice)
        stats["tensorized"] = [
            {
                "name": r.name,
                "shape": list(r.shape),
                "ratio": r.ratio,
                "rel_error": r.rel_error,
                "status": r.status,
            }
            for r in rep.rows
        ]
        stats["rank"] = rank
        atomic_save({"modules": list(s.modules), "student": student.cpu(), "stats": stats}, ckpt[s.name])
        if sequential:
            _install(base, {"modules": list(s.modules), "student": student.to(device)})
        del data
        shutil.rmtree(store / s.name, ignore_errors=True)  # features are no longer needed: free the disk
        if progress:
            print(
                f"[rank {rank}] {s.name}: nmse {stats['initial_nmse']:.4f} -> {stats['final_nmse']:.4f} "
                f"({stats['steps']} steps, {stats['seconds']:.1f}s)",
                flush=True,
            )
    shutil.rmtree(store / "_tokens", ignore_errors=True)  # the token masks: needed only while slices train
    for d in (store, store.parent):  # and the folders, once empty (other ranks' features may still be there)
        remove_empty(d)
    if rank != 0:
        return None

    deadline = time.monotonic() + wait_timeout
    while not all(p.is_file() for p in ckpt.values()):
        if time.monotonic() > deadline:
            missing = [n for n, p in ckpt.items() if not p.is_file()]
            raise TimeoutError(
                f"rank 0 waited {wait_timeout:.0f}s for slice checkpoints {missing}; did a rank die? "
                "rerun the same command: finished slices are kept"
            )
        time.sleep(2.0)
    slice_stats = []
    for s in specs:
        saved = torch.load(ckpt[s.name], weights_only=False, map_location=device)
        _install(base, saved)
        slice_stats.append(saved["stats"])
    if head:  # the last slice, on the compressed blocks' outputs; rank 0 only, after every block is in place
        head_ckpt = out / "slices" / "lm_head.pt"
        if not head_ckpt.is_file():
            student, stats = distill_head(model, calib, ratio=ratio, steps=steps, lr=head_lr)
            atomic_save({"student": student.cpu(), "stats": stats}, head_ckpt)
        saved = torch.load(head_ckpt, weights_only=False, map_location=device)
        install_head(model, saved["student"].to(device))
        slice_stats.append(saved["stats"])
    # compress_model changed the caller's model in place: its save_pretrained would now write factors that
    # from_pretrained reloads as random dense layers (tnkernels/convert/hf_save.py)
    tnkernels.convert.guard_save_pretrained(model)
    tnkernels.save_compressed(model if head else base, out / "compressed")
    report = {
        "model_family": family,
        "model_class": type(base).__name__,
        "preset": preset,
        "ratio": ratio,
        "attention": attention,
        "init": init,
        "sequential": sequential,
        "world_size": world,
        "num_slices": len(specs),
        "params_before": params_before,
        "params_after": tnkernels.count_params(base) + (tnkernels.count_params(model.lm_head) if head else 0),
        "head": head,
        "capture_seconds_rank0": capture_s,
        "capture": cap,
        "slices": slice_stats,
    }
    if teacher is not None:
        report["metrics"] = compare(model, held, teacher)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=float))
    return report


def _install(base: nn.Module, saved: dict) -> None:
    """Put a trained slice (a checkpoint dict: module names and the student ModuleList) into ``base``."""
    for name, module in zip(saved["modules"], saved["student"], strict=True):
        set_submodule(base, name, module)


def _student_inputs(model, spec, calib, store: Path, data: list[dict], device, progress) -> list[dict]:
    """Sequential mode: ``data`` (teacher features of ``spec``) with its inputs replaced by the ones the
    partly compressed ``model`` feeds the slice; the targets stay the teacher's, so the slice also learns to
    undo the error of the compressed slices before it."""
    shutil.rmtree(store, ignore_errors=True)
    capture_features(model, [spec], calib, store, progress=progress)
    student_data = load_slice_features(store, spec.name, device=device)
    shutil.rmtree(store, ignore_errors=True)
    if len(student_data) != len(data):
        raise RuntimeError(f"slice {spec.name!r}: {len(student_data)} student batches vs {len(data)} teacher")
    return [{**d, "x": sd["x"], "kwargs": sd["kwargs"]} for d, sd in zip(data, student_data, strict=True)]


def prepare_run(args: argparse.Namespace) -> None:
    """--threads (torch CPU threads) and --no-progress (transformers' loading bars too), for compress and eval."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        torch.set_num_threads(threads)
    if not option(args, "progress"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _sequential(args, world: int) -> bool:
    mode = getattr(args, "mode", None)
    if mode is None:
        return DEFAULTS["sequential"] and world == 1
    return mode == "sequential"


def compress_hf(args: argparse.Namespace) -> dict | None:
    """``tnk compress --model DIR`` for a Hugging Face folder (flags: :func:`add_arguments`)."""
    check_compress_args(args)
    rank, world = dist_env()
    prepare_run(args)
    check_out(args.out)
    check_kind(args.out, "hf")
    check_model_dir(args.model, option(args, "seq_len"))
    if rank == 0:
        clean_stale_tmp(args.out)  # a save_compressed killed in an earlier run
    tokenizer_dir = option(args, "tokenizer")
    model, tokenizer = load_hf_model(args.model, with_tokenizer=tokenizer_dir is None)
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"--tokenizer {tokenizer_dir}: {len(tokenizer)} tokens, but the model embeds only "
                f"{model.get_input_embeddings().num_embeddings}; give the tokenizer the model was trained with"
            )
    family = family_of(model)
    calib, held = calibration_data(
        family,
        tokenizer,
        text_path=option(args, "text"),
        seq_len=option(args, "seq_len"),
        num_samples=option(args, "num_samples"),
        batch_size=option(args, "batch_size"),
    )
    layers = option(args, "layers")
    if isinstance(layers, str):
        try:
            layers = [int(v) for v in layers.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--layers {layers!r}: give comma-separated block indices like 0,1,5") from None
    report = compress_model(
        model,
        calib,
        args.out,
        ratio=args.ratio,
        preset=option(args, "preset"),
        attention=option(args, "attention"),
        group_size=option(args, "group_size"),
        layers=layers,
        steps=option(args, "steps"),
        lr=option(args, "lr"),
        fp16_features=option(args, "fp16_features"),
        num_cores=option(args, "num_cores"),
        init=option(args, "init"),
        sequential=_sequential(args, world),
        max_seconds_per_slice=option(args, "max_seconds_per_slice"),
        head=option(args, "head"),
        head_lr=option(args, "head_lr"),
        held=held if option(args, "eval") else None,
        device=option(args, "device"),
        progress=option(args, "progress"),
        rank=rank,
        world=world,
    )
    if report is not None and "metrics" in report:
        print(json.dumps(report["metrics"], indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m distill.hf.pipeline`` (and ``torchrun ... -m distill.hf.pipeline``) with the same flags."""
    p = argparse.ArgumentParser(prog="python -m distill.hf.pipeline", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        compress_hf(p.parse_args(argv))
    except ValueError as exc:  # bad flags or inputs: one line naming the fix, as `tnk compress` prints them
        p.error(str(exc))


if __name__ == "__main__":
    main()

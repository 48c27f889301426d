"""The texts of `tnk compress / eval / sensitivity --help`, and which flags belong to which kind of model.

`tnk compress` and `tnk eval` serve two pipelines: torchvision ResNets (``--model resnet18/resnet34``) and Hugging
Face folders (``--model DIR`` with config.json). A flag of one pipeline passed with a model of the other is an
error (it would be silently ignored otherwise); "passed" means its value differs from the parser's default.
"""

from __future__ import annotations

import argparse

RESNET_ONLY = (
    "weights", "data", "image_size", "teacher_epochs", "budget", "slices", "workers", "calib_fraction",
    "global_baseline", "kd_weight", "memory_budget_mb", "sensitivity",
)  # fmt: skip
HF_ONLY = (
    "preset", "attention", "head", "head_lr", "text", "tokenizer", "seq_len", "num_samples", "group_size", "layers",
    "num_cores", "init", "eval",
)  # fmt: skip
RESNET_GROUP = "ResNet models only (--model resnet34 / resnet18)"
HF_GROUP = "Hugging Face models only (--model DIR holding config.json)"

_KINDS = (
    "Two kinds of model go through it:\n"
    "  ResNet        --model resnet34 (default) or resnet18: the teacher is trained on --data (the embedded digits\n"
    "                by default) on first use and cached ($TNK_CACHE_DIR)\n"
    "  Hugging Face  --model DIR: a local folder with config.json, the weights and the tokenizer (GPT-2, BERT,\n"
    "                RoBERTa, XLM-R, DistilBERT, Llama, Mistral, Qwen2)\n"
    "The flags in the 'ResNet models only' and 'Hugging Face models only' groups are refused with the other kind."
)
COMPRESS_DESCRIPTION = (
    "Slice-wise feature distillation: the pretrained model is cut into slices, each slice's layers are tensorized "
    "(Tucker-2 for convolutions, MPO for linear layers) and each slice is trained alone to reproduce the teacher's "
    "output of that slice; no global fine-tune. Writes OUT/compressed (load it with tnkernels.load_compressed), "
    "OUT/report.json, OUT/slices (a killed run resumes) and plots.\n\n" + _KINDS
)
COMPRESS_EPILOG = """examples:
  tnk compress                                     ResNet-34 on the embedded digits at 2x, into distill_out/
  tnk compress --model resnet18 --ratio 4 --calib-fraction 0.1 --global-baseline --out r18x4
  tnk compress --budget out/budget.json --out out  per-layer ratios from `tnk sensitivity --target-ratio 4`
  tnk compress --model ./gpt2 --ratio 2 --text corpus.jsonl --out gpt2-x2
"""
EVAL_DESCRIPTION = (
    "Evaluate a teacher or a compressed student. ResNet: test accuracy on --data (the teacher is loaded from "
    "--weights, or from the cache, or trained now). Hugging Face: the metrics tnk compress reports (perplexity for "
    "decoders, sentence-embedding agreement for encoders) of OUT/compressed against its teacher --model DIR."
)
EVAL_EPILOG = """examples:
  tnk eval                                         the cached ResNet-34 teacher's test accuracy
  tnk eval --compressed distill_out/compressed     a compressed ResNet-34 student
  tnk eval --model ./gpt2 --compressed gpt2-x2/compressed --text other.txt
"""
SENSITIVITY_DESCRIPTION = (
    "Per-layer sensitivity scan of a torchvision ResNet (resnet34 or resnet18; Hugging Face folders are not "
    "supported): each layer is tensorized alone at each of --ratios and the model scored on calibration images. "
    "Writes OUT/sensitivity.json and a heat map; with --target-ratio also OUT/budget.json, per-layer ratios for "
    "`tnk compress --budget`."
)
SENSITIVITY_EPILOG = """examples:
  tnk sensitivity --ratios 2 4 8 --target-ratio 4 --out out
  tnk sensitivity --model resnet18 --layers layer1.0.conv1 layer4.1.conv2 --metric accuracy --out s18
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it says something (not for flags, not for None, not twice); keeps the
    description's and the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):  # paragraphs wrapped, indented lines (lists, examples) kept
        paras = text.split("\n\n")
        out = [
            p if "\n " in p or p.startswith(" ") else argparse.HelpFormatter._fill_text(self, p, width, indent)
            for p in paras
        ]
        return "\n\n".join(out)


def record_defaults(p: argparse.ArgumentParser) -> None:
    """Remember each option's flag and default, so a command can tell which options the user passed."""
    flags = {a.dest: (a.option_strings[-1], a.default) for a in p._actions if a.option_strings and a.dest != "help"}
    p.set_defaults(_flags=flags)


def check_pipeline_flags(args: argparse.Namespace, *, hf: bool) -> None:
    """ValueError naming the flags the user passed that the other pipeline owns."""
    flags = getattr(args, "_flags", {})
    wrong = RESNET_ONLY if hf else HF_ONLY
    passed = [flags[d][0] for d in wrong if d in flags and getattr(args, d, flags[d][1]) != flags[d][1]]
    if not passed:
        return
    which = "ResNet models (--model resnet34 / resnet18)" if hf else "Hugging Face models (--model DIR)"
    this = f"{args.model} is a Hugging Face folder" if hf else f"{args.model or 'resnet34'} is a ResNet"
    verb, it = ("applies", "it") if len(passed) == 1 else ("apply", "them")
    raise ValueError(f"{', '.join(passed)} {verb} only to {which}; --model {this}: drop {it}")


def check_sensitivity_model(model: str | None, *, hf: bool) -> None:
    """`tnk sensitivity` scans torchvision ResNets only: a clear error for a Hugging Face folder or an unknown name."""
    from .teacher import MODELS, unknown_model_message

    if hf:
        raise ValueError(
            f"--model {model}: tnk sensitivity supports the torchvision ResNets only ({', '.join(MODELS)}), not "
            "Hugging Face folders; compress a Hugging Face model with a uniform --ratio (tnk compress --model DIR)"
        )
    if (model or "resnet34") not in MODELS:
        raise ValueError(unknown_model_message(model, hf=False))

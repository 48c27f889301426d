"""Hugging Face transformers (GPT-2 with Conv1D, BERT) slice-wise compression; see docs/hf.md.

Import submodules directly (``distill.hf.pipeline``, ``distill.hf.presets``, ...): importing this package does not
import transformers, so ``tnk`` starts fast and works without it.
"""

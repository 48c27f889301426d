"""Calibration and evaluation text: read it, split it, tokenize it into fixed-length batches.

The default corpus (``distill/hf/data/corpus.txt``) ships in the repository so everything runs offline. It was
written for this project (51 short paragraphs of plain English on everyday, science and software topics, one
paragraph per line) and is released with the repository under its license; it holds no third-party text.

User files: plain text (one paragraph or sentence per non-empty line) or JSON Lines with a ``"text"`` field
(``.jsonl`` / ``.json`` suffix).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_CORPUS = Path(__file__).with_name("data") / "corpus.txt"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def read_texts(path: str | os.PathLike | None = None) -> list[str]:
    """Non-empty texts from ``path`` (plain text: one per line; jsonl: the ``"text"`` field of each record).

    ``None`` reads the embedded default corpus.
    """
    path = Path(path) if path is not None else DEFAULT_CORPUS
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ValueError(
            f"--text: calibration text file {str(path)!r} {what}; pass a plain-text or .jsonl file, "
            "or omit it to use the embedded corpus"
        )
    try:
        texts = _read_texts(path)
        if any("\x00" in t for t in texts):
            raise ValueError(
                f"--text {path}: holds NUL bytes, so it is a binary file; give a plain-text or .jsonl file"
            )
        return texts
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"--text {path}: not UTF-8 text (it holds the byte {exc.object[exc.start]:#04x}); give a "
            "plain-text or .jsonl file encoded in UTF-8 (convert it with e.g. iconv -t utf-8)"
        ) from None


def _read_texts(path: Path) -> list[str]:
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        if path.suffix in (".jsonl", ".json"):
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}:{lineno}: not valid JSON ({e.msg}); a .jsonl file needs one JSON "
                        'object per line like {"text": "..."}'
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f'{path}:{lineno}: a .jsonl record needs a string "text" field')
                if record["text"].strip():
                    texts.append(record["text"].strip())
        else:
            texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise ValueError(f"calibration text file {str(path)!r} holds no text")
    return texts


def split_sentences(texts: Sequence[str]) -> list[str]:
    """Sentences of ``texts`` (split after . ! ? followed by a capital, digit or quote)."""
    return [s.strip() for t in texts for s in _SENTENCE_END.split(t) if s.strip()]


def split_holdout(items: Sequence, holdout_every: int = 5) -> tuple[list, list]:
    """(calibration, held-out): every ``holdout_every``-th item is held out, so both halves span all
    topics and the split is the same on every run."""
    if holdout_every < 2:
        raise ValueError(f"holdout_every={holdout_every} must be >= 2 (1 would hold out everything)")
    calib = [x for i, x in enumerate(items) if i % holdout_every != holdout_every - 1]
    held = [x for i, x in enumerate(items) if i % holdout_every == holdout_every - 1]
    return calib, held


def causal_lm_blocks(texts: Sequence[str], tokenizer, seq_len: int, *, max_blocks: int | None = None) -> torch.Tensor:
    """``LongTensor[n, seq_len]``: the texts tokenized, joined by the EOS token, cut into full-length blocks.

    The usual language-model packing: no padding, so every position is a real prediction target. The tail that
    does not fill a block is dropped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (perplexity predicts token t+1 from tokens <= t)")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + sep)
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than seq_len={seq_len}; give more text or a shorter --seq-len"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def encode_sentences(sentences: Sequence[str], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` of shape ``[n, seq_len]``: each sentence padded/truncated to
    ``seq_len`` (encoder calibration and evaluation; padding positions are masked)."""
    if not sentences:
        raise ValueError("no sentences to encode")
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batches(inputs: torch.Tensor | dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split ``[n, T]`` token ids (or a dict of them) into model-call dicts of ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    d = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else inputs
    n = d["input_ids"].shape[0]
    return [{k: v[i : i + batch_size] for k, v in d.items()} for i in range(0, n, batch_size)]

"""Evaluation of compressed Hugging Face models against their teacher.

* Causal LMs: perplexity on held-out token blocks (``exp`` of the mean next-token negative log-likelihood).
* Encoders: mean-pooled sentence embeddings (the all-MiniLM / sentence-transformers recipe: average the
  last hidden states over non-padding tokens, then L2-normalise); cosine to the teacher's embedding of the
  same sentence, and agreement of nearest-neighbour retrieval among the held-out sentences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(lm: nn.Module, blocks: torch.Tensor, *, batch_size: int = 8) -> float:
    """Perplexity of causal LM ``lm`` (with a head, returning ``.logits``) on ``blocks[n, T]`` token ids."""
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [n, T>=2] token ids, got shape {tuple(blocks.shape)}")
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size].to(device)
        logits = lm(input_ids=ids).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    lm.train(was_training)
    return math.exp(nll / count)


@torch.no_grad()
def sentence_embeddings(encoder: nn.Module, encoded: dict[str, torch.Tensor], *, batch_size: int = 32) -> torch.Tensor:
    """``[n, hidden]`` L2-normalised mean-pooled last hidden states of an encoder (padding excluded)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    n = encoded["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        batch = {k: v[i : i + batch_size].to(device) for k, v in encoded.items()}
        hidden = encoder(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(F.normalize(pooled, dim=-1).cpu())
    encoder.train(was_training)
    return torch.cat(out)


def embedding_agreement(teacher: torch.Tensor, student: torch.Tensor, *, k: int = 5) -> dict[str, float]:
    """Compare student embeddings with the teacher's, row ``i`` = sentence ``i`` in both.

    ``mean_cosine`` / ``min_cosine``: cosine between the two embeddings of each sentence. ``retrieval_top1``:
    fraction of sentences whose nearest other sentence is the same under both models.
    ``retrieval_topk_overlap``: mean overlap of the ``k`` nearest other sentences (|A & B| / k).
    """
    if teacher.shape != student.shape or teacher.ndim != 2:
        raise ValueError(
            f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} embeddings must both "
            "be [n_sentences, hidden]"
        )
    n = teacher.shape[0]
    if n < 3:
        raise ValueError(f"retrieval agreement needs at least 3 sentences, got {n}")
    k = min(k, n - 1)
    t = F.normalize(teacher.double(), dim=-1)
    s = F.normalize(student.double(), dim=-1)
    cos = (t * s).sum(-1)

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)  # a sentence is not its own neighbour
        return sim.topk(k, dim=-1).indices

    nt, ns = neighbours(t), neighbours(s)
    top1 = (nt[:, 0] == ns[:, 0]).double().mean().item()
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nt, ns, strict=True)) / (n * k)
    return {
        "mean_cosine": cos.mean().item(),
        "min_cosine": cos.min().item(),
        "retrieval_top1": top1,
        f"retrieval_top{k}_overlap": overlap,
        "n_sentences": n,
    }

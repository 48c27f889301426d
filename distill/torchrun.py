"""What a process learns from torchrun's environment, one rule for both pipelines (ResNet and Hugging Face)."""

from __future__ import annotations

import os


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str) -> str:
    """A bare ``cuda`` under torchrun is this rank's GPU (LOCAL_RANK): `torchrun --nproc_per_node 8 ... --device
    cuda` put every rank on GPU 0. An explicit index (``cuda:3``) is what the user asked for and is kept."""
    if device == "cuda" and dist_env()[1] > 1:
        return f"cuda:{local_rank()}"
    return device

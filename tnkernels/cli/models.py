"""Models that `tnk inspect` can build by name or load from a local path."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TORCHVISION = ("resnet18", "resnet34", "resnet50")
HF_CONFIGS = ("gpt2", "gpt2-medium", "gpt2-xl", "bert", "minilm")


def list_models() -> str:
    return ", ".join((*TORCHVISION, *HF_CONFIGS)) + ", or a local path (Hugging Face directory or .pt/.pth state dict)"


def _hf():
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("this model needs transformers: pip install 'tnkernels[hf]'") from exc
    return transformers


def _hf_from_config(name: str) -> nn.Module:
    tf = _hf()
    if name.startswith("gpt2"):
        sizes = {
            "gpt2": {},
            "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
            "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
        }[name]
        return tf.GPT2LMHeadModel(tf.GPT2Config(**sizes))
    if name == "bert":
        return tf.BertModel(tf.BertConfig())
    # all-MiniLM-L6-v2's shapes
    return tf.BertModel(
        tf.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    )


def build_model(name: str, weights: str | None = None, num_classes: int | None = None) -> tuple[nn.Module, str]:
    """Return (model, description). Random weights unless `weights` or a local path is given."""
    import torchvision

    path = Path(name)
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
            tf = _hf()
            return tf.AutoModel.from_pretrained(str(path), local_files_only=True), f"Hugging Face model from {path}"
        raise ValueError(f"{path}: for a state dict pass --model <architecture> --weights {path}")
    if name in TORCHVISION:
        kwargs = {"num_classes": num_classes} if num_classes else {}
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
        desc = f"torchvision {name}"
        if weights:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"--weights {weights}: no such file")
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(f"--weights {weights} does not fit {name}: {str(exc)[:300]}") from exc
            return model, f"{desc} with weights from {weights}"
        return model, f"{desc} (random weights: errors are pessimistic, trained weights compress better)"
    if name in HF_CONFIGS:
        return _hf_from_config(name), f"{name} built from its config (random weights)"
    raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")

"""Load Hugging Face GPT-2 / BERT / Llama-family models from a local folder or build them from a config; name their
blocks.

Everything here works offline: loading sets ``HF_HUB_OFFLINE=1`` and passes ``local_files_only=True``, so a
missing file is an error about the directory, never a download attempt.

Module names used by the presets are qualified names *relative to the base model* (``GPT2Model`` /
``BertModel`` / ``LlamaModel``, what ``AutoModel.from_pretrained(DIR)`` returns), so a compressed model saved from
the base model loads into the ``AutoModel`` skeleton. For a causal LM the base model is ``lm.transformer`` (GPT-2)
or ``lm.model`` (Llama); :func:`base_model` finds it.

The "llama" family is every decoder with Llama's module layout: ``layers.i.self_attn.{q,k,v,o}_proj``,
``layers.i.mlp.{gate,up,down}_proj`` (nn.Linear), rotary position embeddings passed to each layer. Mistral and
Qwen2 checkpoints have the same layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

FAMILIES = ("gpt2", "bert", "distilbert", "llama")
CAUSAL_FAMILIES = ("gpt2", "llama")  # decoders: perplexity, token-block calibration, an LM head
# model_type values (config.json) handled by each family's module layout.
# RoBERTa and XLM-RoBERTa have BERT's module layout (encoder.layer.i.attention / intermediate / output).
_MODEL_TYPES = {
    "gpt2": "gpt2",
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "distilbert",
    "llama": "llama", "mistral": "llama", "qwen2": "llama",
}  # fmt: skip
_DESCRIPTION = (
    "GPT-2 with Conv1D, BERT-layout encoders: bert, roberta, xlm-roberta, DistilBERT, "
    "Llama-layout decoders: llama, mistral, qwen2"
)


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a Hugging Face ``config.json`` (the CLI's dispatch test)."""
    return Path(path, "config.json").is_file()


def _read_model_type(model_dir: Path) -> str:
    if not is_hf_model_dir(model_dir):
        raise ValueError(
            f"model directory {str(model_dir)!r} has no config.json; pass a local Hugging Face model "
            "folder (the one holding config.json and the weights)"
        )
    return _family(read_config(model_dir).get("model_type"), f" in {model_dir}/config.json")


def read_config(model_dir: str | os.PathLike) -> dict:
    """``config.json`` of a model folder as a dict; a file that is not a JSON object is a ValueError naming it."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"--model {model_dir}: {path} is not valid JSON ({exc}); save the model with save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"--model {model_dir}: {path} holds a {type(config).__name__}, not a JSON object")
    return config


_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip


def check_weights(model_dir: str | os.PathLike) -> None:
    """ValueError naming the folder when it holds a config.json but no weights ``from_pretrained`` can read."""
    if not any((Path(model_dir) / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(
            f"--model {model_dir}: the folder has config.json but no weights ({' or '.join(_WEIGHT_FILES[::2])}); "
            "save the model into it with model.save_pretrained(DIR)"
        )


def max_positions(config: dict) -> int | None:
    """The longest sequence the model's position embeddings cover (RoBERTa's start after the padding index)."""
    n = config.get("n_positions") or config.get("max_position_embeddings")
    if not isinstance(n, int):
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        n -= int(config.get("pad_token_id") or 0) + 1
    return n


def check_model_dir(model_dir: str | os.PathLike, seq_len: int | None) -> None:
    """Up-front checks of a model folder: a readable config.json, weights, ``--seq-len`` within its positions."""
    config = read_config(model_dir)
    check_weights(model_dir)
    check_seq_len(model_dir, seq_len, config)


def check_seq_len(model_dir: str | os.PathLike, seq_len: int | None, config: dict | None = None) -> None:
    """ValueError when ``--seq-len`` exceeds the positions the model was built for (before any loading);
    `config`: the folder's config.json when already read."""
    limit = max_positions(read_config(model_dir) if config is None else config)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise ValueError(
            f"--seq-len {seq_len} is longer than the model's {limit} positions (config.json of {model_dir}); "
            f"use --seq-len {limit} or less"
        )


def _family(model_type, where: str = "") -> str:
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r}{where} is not supported; supported families: {FAMILIES} ({_DESCRIPTION})"
        )
    return _MODEL_TYPES[model_type]


def family_of(model_or_config) -> str:
    """The family ('gpt2', 'bert', 'distilbert' or 'llama') of a model (base or with a head) or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    return _family(getattr(config, "model_type", None))


def load_hf_model(model_dir: str | os.PathLike, *, causal_lm: bool | None = None, with_tokenizer: bool = True):
    """Load ``(model, tokenizer_or_None)`` from a local folder, in eval mode, float32.

    ``causal_lm=None`` picks ``AutoModelForCausalLM`` for the decoders (perplexity needs the LM head) and
    ``AutoModel`` for BERT. The tokenizer is ``None`` when the folder has no tokenizer files.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM

    model_dir = Path(model_dir)
    family = _read_model_type(model_dir)
    check_weights(model_dir)
    if causal_lm is None:
        causal_lm = family in CAUSAL_FAMILIES
    if causal_lm and family not in CAUSAL_FAMILIES:
        raise ValueError(f"causal_lm=True needs a decoder (GPT-2 or Llama family), {model_dir} holds a {family} model")
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    # float32 whatever the checkpoint's dtype: transformers 5 loads a bfloat16 / float16 checkpoint (Llama, Mistral
    # and Qwen2 ship in bfloat16) in that dtype, and the float32 features and students then met a half-precision
    # model ("mat1 and mat2 must have the same dtype"). .float() rather than from_pretrained's dtype argument, which
    # transformers before 4.56 does not take (it is torch_dtype there).
    model = cls.from_pretrained(model_dir, local_files_only=True).float().eval()
    tokenizer = load_tokenizer(model_dir) if with_tokenizer and has_tokenizer(model_dir) else None
    return model, tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in a local folder (``save_pretrained``), with a pad token (GPT-2 ships without one;
    padded positions are masked anyway)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if not has_tokenizer(folder):
        raise ValueError(
            f"--tokenizer: {str(folder)!r} holds none of {', '.join(_TOKENIZER_FILES)}; give a folder where a "
            "tokenizer was saved with save_pretrained"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_from_config(model_type: str, *, causal_lm: bool | None = None, seed: int | None = 0, **config_overrides):
    """A randomly initialised model of ``model_type`` (a family, 'gpt2', 'bert' or 'llama', or another
    config.json model type of one: 'roberta', 'mistral', ...) from a config, in eval mode.

    ``config_overrides`` are config fields (``n_layer=2, n_embd=32`` for GPT-2; ``num_hidden_layers=2,
    hidden_size=32`` for BERT and Llama). Used by tests (tiny configs) and the GPT-2 XL-shaped scale benchmark.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; use one of {sorted(_MODEL_TYPES)}")
    family = _MODEL_TYPES[model_type]
    config = AutoConfig.for_model(model_type, **config_overrides)
    if causal_lm is None:
        causal_lm = family in CAUSAL_FAMILIES
    if seed is not None:
        torch.manual_seed(seed)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    return cls.from_config(config).eval()


def base_model(model: nn.Module) -> nn.Module:
    """The ``GPT2Model`` / ``BertModel`` / ``LlamaModel`` inside ``model`` (the model itself when it is one)."""
    family = family_of(model)
    prefix = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix, None) if prefix else None
    if isinstance(inner, nn.Module) and family_of(inner) == family:
        return inner
    return model


# Per family, the ModuleList of transformer blocks in the base model
_BLOCK_LISTS = {"gpt2": "h", "bert": "encoder.layer", "distilbert": "transformer.layer", "llama": "layers"}


def block_names(model: nn.Module) -> list[str]:
    """Qualified names (relative to ``base_model(model)``) of the transformer blocks, in execution order."""
    base = base_model(model)
    blocks = _BLOCK_LISTS[family_of(base)]
    return [f"{blocks}.{i}" for i in range(len(base.get_submodule(blocks)))]


def hidden_size(model: nn.Module) -> int:
    config = base_model(model).config
    return int(getattr(config, "n_embd", None) or config.hidden_size)

"""Slice presets for GPT-2, BERT and Llama-layout decoders: which consecutive submodules form one independently
trained slice.

Presets (names relative to the base model, see ``models.base_model``; ``i`` is the block index):

=========  =======================  ==============================================  ==============================
preset     GPT-2 (``GPT2Model``)    BERT (``BertModel``)                            Llama (``LlamaModel``)
=========  =======================  ==============================================  ==============================
``mlp``    ``h.i.mlp``              ``encoder.layer.i.intermediate`` + ``...output``  ``layers.i.mlp``
``attn``   ``h.i.attn``             ``encoder.layer.i.attention``                   ``layers.i.self_attn``
``block``  ``h.i``                  ``encoder.layer.i``                             ``layers.i``
``group``  ``h.i`` ... ``h.i+g-1``  ``encoder.layer.i`` ... ``encoder.layer.i+g-1``  ``layers.i`` ... ``layers.i+g-1``
=========  =======================  ==============================================  ==============================

Every slice is a function of one tensor (its first module's first argument) plus the keyword arguments
captured from that first module's call (attention mask, position ids, ...); :func:`run_hf_slice` runs it. Two
details of Hugging Face modules need more than the generic ``distill.slices.run_slice``:

* BERT's FFN ends in ``BertOutput.forward(hidden_states, input_tensor)``, whose ``input_tensor`` is the
  residual, i.e. the FFN's own input (``BertLayer.feed_forward_chunk``); :func:`run_hf_slice` feeds the slice
  input there.
* Submodules that do not take ``**kwargs`` (``GPT2MLP``, ``BertIntermediate``) get only the arguments their
  signature names, so one kwargs dict serves a whole slice.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

from distill.slices import SliceSpec

from .models import base_model, block_names, family_of

PRESETS = ("mlp", "attn", "block", "group")

# The preset used when none is given. BERT: a whole layer per slice, only its FFN tensorized, so the slice's
# dense attention and LayerNorms train with the MPO cores and absorb part of the FFN's error (all-MiniLM-L6-v2,
# FFNs at 2x, sequential: mean cosine 0.921 vs 0.916 with mlp slices). GPT-2: mlp slices (the GPT-2 bench at 2x,
# KL to the teacher 0.00099 with mlp vs 0.00108 with block). Measurements: bench/results/hf_minilm_experiments/.
# Llama: mlp, as GPT-2 (not measured on a pretrained Llama here: no weights offline).
DEFAULT_PRESET = {"gpt2": "mlp", "bert": "block", "distilbert": "block", "llama": "mlp"}

# Module-name fragments of attention sub-layers: the pipeline leaves them dense unless --attention is given.
ATTENTION_PATTERNS = {
    "gpt2": ("*attn*",), "bert": ("*attention*",), "distilbert": ("*attention*",), "llama": ("*self_attn*",)
}  # fmt: skip
# Per family: the attention and the FFN submodule of block i (attn / mlp presets)
_ATTN = {
    "gpt2": ("{b}.attn",), "bert": ("{b}.attention",), "distilbert": ("{b}.attention",), "llama": ("{b}.self_attn",)
}  # fmt: skip
_MLP = {
    "gpt2": ("{b}.mlp",), "bert": ("{b}.intermediate", "{b}.output"), "distilbert": ("{b}.ffn",), "llama": ("{b}.mlp",)
}  # fmt: skip


def default_preset(model: nn.Module) -> str:
    """The preset of ``model``'s family when the caller names none (``DEFAULT_PRESET``)."""
    return DEFAULT_PRESET[family_of(model)]


def slice_specs(
    model: nn.Module, preset: str | None, *, group_size: int = 2, layers: Sequence[int] | None = None
) -> list[SliceSpec]:
    """The :class:`SliceSpec` list of ``preset`` for ``model`` (GPT-2, BERT or Llama, with or without a head).

    ``preset=None`` picks the family's default (:func:`default_preset`).
    ``layers`` restricts to those block indices (``mlp``/``attn``/``block``) or to groups starting at them.
    ``group`` cuts the blocks into consecutive runs of ``group_size`` (the last run may be shorter).
    """
    if preset is None:
        preset = default_preset(model)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; use one of {PRESETS}")
    family = family_of(model)
    blocks = block_names(model)
    n = len(blocks)
    chosen = list(range(n)) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers={bad} out of range: the model has {n} blocks (0..{n - 1})")
    if preset == "group":
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be >= 1")
        starts = [s for s in range(0, n, group_size) if s in set(chosen)]
        return [
            SliceSpec(name=f"blocks{s}-{min(s + group_size, n) - 1}", modules=tuple(blocks[s : s + group_size]))
            for s in starts
        ]
    specs = []
    for i in chosen:
        b = blocks[i]
        if preset == "block":
            mods = (b,)
        else:
            mods = tuple(m.format(b=b) for m in (_ATTN if preset == "attn" else _MLP)[family])
        specs.append(SliceSpec(name=f"{preset}{i}", modules=mods))
    return specs


def resolve(model: nn.Module, spec: SliceSpec) -> list[nn.Module]:
    """The modules of ``spec`` inside ``base_model(model)``."""
    base = base_model(model)
    try:
        return [base.get_submodule(name) for name in spec.modules]
    except AttributeError as e:
        raise ValueError(
            f"slice {spec.name!r}: {e}; slice module names are relative to the base model ({type(base).__name__})"
        ) from None


@lru_cache(maxsize=256)
def _signature_info(forward_cls: type) -> tuple[frozenset, bool, bool]:
    params = inspect.signature(forward_cls.forward).parameters
    names = frozenset(p for p in params if p != "self")
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    needs_residual = "input_tensor" in params and params["input_tensor"].default is inspect.Parameter.empty
    return names, var_kw, needs_residual


def run_hf_slice(modules: Sequence[nn.Module], x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run a slice: ``x`` through ``modules`` in order, each given the kwargs its ``forward`` accepts.

    A tuple output continues with its first element (attention modules return ``(output, weights)``).
    """
    x0 = x
    for m in modules:
        names, var_kw, needs_residual = _signature_info(type(m))
        kw = dict(kwargs) if var_kw else {k: v for k, v in kwargs.items() if k in names}
        if needs_residual and "input_tensor" not in kw:
            kw["input_tensor"] = x0  # BertOutput / BertSelfOutput: the residual is the slice input
        out = m(x, **kw)
        x = out[0] if isinstance(out, tuple) else out
    return x


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """Split a module call into (first argument, keyword arguments to replay it).

    Hugging Face encoders pass the attention mask *positionally* (``layer(hidden, mask, ...)`` in transformers
    5.x), so the call is bound to the forward signature to give every argument its name. Only tensors (and
    tuples of tensors, e.g. rotary position embeddings) are kept: caches and flags are not slice inputs, and
    replaying without them means "no cache", which is what a slice needs.
    """
    sig = inspect.signature(type(module).forward)
    bound = sig.bind(module, *args, **kwargs)
    items = list(bound.arguments.items())[1:]  # drop self
    if not items:
        raise ValueError(f"{type(module).__name__} was called without inputs")
    (_, x), rest = items[0], items[1:]
    out = {}
    for name, value in rest:
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update({k: v for k, v in value.items() if _is_tensorish(v)})
        elif _is_tensorish(value):
            out[name] = value
    return x, out


def _is_tensorish(v) -> bool:
    return isinstance(v, torch.Tensor) or (
        isinstance(v, tuple) and len(v) > 0 and all(isinstance(t, torch.Tensor) for t in v)
    )

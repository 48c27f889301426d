"""`save_pretrained` of a Hugging Face model with tensorized layers: a clear error instead of a silent trap.

transformers' `save_pretrained` writes the state dict as it is: a tensorized layer's factors under `<layer>.cores.0`,
... `from_pretrained(DIR)` then builds the dense architecture from config.json, finds no `<layer>.weight`, fills
those layers with random weights and only logs a load report: a model that runs and is wrong. Nothing in the
saved folder can make `from_pretrained` refuse (unknown keys and unknown config entries are only reported), so
the refusal has to come at save time. tensorize() and load_compressed() therefore shadow `save_pretrained` on
each transformers model in the converted tree with an instance attribute (the class and every other model stay
untouched) that raises, naming the layers and `save_compressed`, the format that reloads the factors. Once no
tensorized layer is left (all converted back with `to_linear()`), it calls transformers' own method.
`type(model).save_pretrained(model, DIR)` still writes transformers' files on purpose.

transformers is recognised by duck typing (save_pretrained, from_pretrained and a config), as hf_compat
recognises Conv1D, so tnkernels does not import it.
"""

from __future__ import annotations

import copy
import weakref

from torch import nn

from ..nn import MPOLinear, TuckerConv2d


def is_hf_pretrained(module: nn.Module) -> bool:
    """Whether `module` is a transformers PreTrainedModel (GPT2LMHeadModel, BertModel, ...)."""
    cls = type(module)
    return (
        callable(getattr(cls, "save_pretrained", None))
        and callable(getattr(cls, "from_pretrained", None))
        and (hasattr(module, "config"))
    )


class RefuseSavePretrained:
    """The instance attribute that shadows `model.save_pretrained` while `model` has tensorized layers. A plain
    object (not a bound method) so that copy.deepcopy and torch.save / pickle carry it with the model.

    It holds its model weakly: a strong reference would make model and guard a reference cycle, and `del model`
    would no longer free the model (and its GPU memory) until Python's cyclic garbage collector runs."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    @property
    def model(self) -> nn.Module:
        return self._model()

    def __deepcopy__(self, memo):  # deepcopy(model) reaches here with the model's copy already in memo
        return RefuseSavePretrained(copy.deepcopy(self.model, memo))

    def __reduce__(self):  # pickle memoizes the model before its __dict__, so this refers back to it
        return RefuseSavePretrained, (self.model,)

    def __call__(self, save_directory, *args, **kwargs):
        model = self.model
        names = [n for n, m in model.named_modules() if isinstance(m, (MPOLinear, TuckerConv2d))]
        if not names:  # every layer converted back to dense: transformers' files reload correctly
            return type(model).save_pretrained(model, save_directory, *args, **kwargs)
        cls = type(model).__name__
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ValueError(
            f"{cls}.save_pretrained: {len(names)} layers are tensorized ({shown}). save_pretrained would store "
            f"their factors under names {cls}.from_pretrained does not know, and from_pretrained would rebuild "
            "them as dense layers with random weights (transformers only logs a warning). Save with "
            "tnkernels.save_compressed(model, DIR) and reload with tnkernels.load_compressed(<the model built "
            "from the original folder: from_pretrained(ORIGINAL) or from_config>, DIR). In a transformers "
            "Trainer (its checkpoints call save_pretrained) set TrainingArguments(save_strategy='no') and call "
            "save_compressed after train(). To write transformers' files anyway (they reload only into this "
            "compressed model, with load_state_dict): type(model).save_pretrained(model, DIR)"
        )

    def __repr__(self) -> str:
        return f"<tnkernels guard of {type(self.model).__name__}.save_pretrained: use tnkernels.save_compressed>"


def guard_save_pretrained(model: nn.Module) -> None:
    """Shadow save_pretrained on `model` and on every transformers model inside it (a causal LM's base model,
    `lm.transformer`, has its own save_pretrained) by RefuseSavePretrained."""
    for module in model.modules():
        if is_hf_pretrained(module) and not isinstance(module.__dict__.get("save_pretrained"), RefuseSavePretrained):
            module.__dict__["save_pretrained"] = RefuseSavePretrained(module)

"""Which child layers a module's own code reads the dense `.weight` of.

Some modules do not just call a child layer: they hand its weight to a functional op (torchvision's Swin attention
calls F.linear(x, self.qkv.weight, ...)) or check its dtype (Hugging Face ViT and CLIP read
`self.patch_embedding.weight.dtype`, T5 `self.wo.weight.dtype`, Mamba multiplies by `self.dt_proj.weight`). A
tensorized child has no dense weight, so the model converted without complaint and failed at its first forward.
tensorize reads the parent class's source instead and leaves such children dense, with the reason in its report.

The scan is textual (`self.<path>.weight` in a method of an ancestor's class or of its bases outside torch.nn; ViT
reads `self.embeddings.patch_embeddings.projection.weight` two levels up), which is
enough for module code as people write it; a reader it misses still meets the explanatory AttributeError of
tnkernels.nn.no_dense_weight. Constructors and weight-initialisation / tying methods are not scanned: they run
before conversion.
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn

_READ = re.compile(r"\bself\.((?:\w+\.)*?\w+)\.weight\b")  # self.<path>.weight, the path maybe dotted
_NOT_SCANNED = ("__init__", "reset_parameters", "_reset_parameters", "_init_weights", "init_weights", "tie_weights")


@functools.cache
def weight_reads(cls: type) -> dict[str, str]:
    """{path below the module ("qkv", "embeddings.patch_embeddings.projection"): the method that reads its .weight}
    for instances of `cls`."""
    found: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch.nn."):
            continue  # nn.Module's own code; torch.nn layers are handled by type (tensorize._unsupported_reason)
        for attr, fn in vars(klass).items():
            if attr in _NOT_SCANNED or "tie" in attr or not inspect.isfunction(fn):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):  # no source (built in a REPL, frozen): nothing to scan
                continue
            for path in _READ.findall(source):
                found.setdefault(path, f"{klass.__name__}.{attr}")
    return found


def weight_reader(model: nn.Module, name: str) -> str | None:
    """The method of an ancestor of the layer `name` in `model` that reads the layer's .weight directly, or None."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):  # the parent first, then up to the model itself
        ancestor = model.get_submodule(".".join(parts[:depth]))
        reader = weight_reads(type(ancestor)).get(".".join(parts[depth:]))
        if reader is not None:
            return reader
    return None

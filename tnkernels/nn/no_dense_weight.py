"""The error for code that reads `.weight` of a tensorized layer.

A tensorized layer keeps only its factors; materializing a dense weight would undo the compression. Code written
for nn.Linear / nn.Conv2d that reads `layer.weight` (nn.MultiheadAttention's out_proj, attention blocks that call
F.linear(x, self.qkv.weight), a dtype check such as `self.proj.weight.dtype`) would otherwise meet torch's bare
"object has no attribute 'weight'", which names neither the cause nor the fix.
"""

from __future__ import annotations


class ExplainsMissingWeight:
    """Mixin (before nn.Module in the bases) whose missing `.weight` raises no_dense_weight_error. Only lookups
    that fail reach __getattr__, so the layers' forward, which reads its parameters from the module's dicts, pays
    nothing for it."""

    dense_method = "to_dense"  # the method that rebuilds the dense layer, named in the error

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "weight":
                raise no_dense_weight_error(type(self).__name__, self.dense_method) from None
            raise


def no_dense_weight_error(layer_kind: str, dense_method: str) -> AttributeError:
    return AttributeError(
        f"{layer_kind} has no dense .weight: a tensorized layer keeps only its factors. The code that read it "
        f"expects an nn.Linear / nn.Conv2d here: leave this layer dense (tensorize(model, rules={{'<its name>': "
        f"None, '*': {{}}}}); `tnk inspect` lists the names), or rebuild the dense weight explicitly with "
        f"layer.{dense_method}()"
    )

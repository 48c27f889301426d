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
                # The layer cannot know where it sits; tensorize and load_compressed note the name they put it
                # under (`tensorized_name`), so that the error names the layer the rule and the fix are about
                # (transformers' resize_token_embeddings reads the weight of a tensorized lm_head, say).
                where = self.__dict__.get("tensorized_name")
                raise no_dense_weight_error(type(self).__name__, self.dense_method, where) from None
            raise


def no_dense_weight_error(layer_kind: str, dense_method: str, name: str | None = None) -> AttributeError:
    layer = f"the layer {name!r}" if name else "a tensorized layer"
    return AttributeError(
        f"{layer_kind} has no dense .weight: {layer} keeps only its factors. The code that read it "
        f"expects an nn.Linear / nn.Conv2d here: leave this layer dense (tensorize(model, rules={{"
        f"{(name or '<its name>')!r}: None, '*': {{}}}}); `tnk inspect` lists the names), or rebuild the dense "
        f"layer explicitly, replacing it by layer.{dense_method}()"
    )

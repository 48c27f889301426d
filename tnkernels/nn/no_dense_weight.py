"""The error for code that reads `.weight` of a tensorized layer.

A tensorized layer keeps only its factors; materializing a dense weight would undo the compression. Code written
for nn.Linear / nn.Conv2d that reads `layer.weight` (nn.MultiheadAttention's out_proj, attention blocks that call
F.linear(x, self.qkv.weight), a dtype check such as `self.proj.weight.dtype`) would otherwise meet torch's bare
"object has no attribute 'weight'", which names neither the cause nor the fix.
"""

from __future__ import annotations


def no_dense_weight_error(layer_kind: str, dense_method: str) -> AttributeError:
    return AttributeError(
        f"{layer_kind} has no dense .weight: a tensorized layer keeps only its factors. The code that read it "
        f"expects an nn.Linear / nn.Conv2d here: leave this layer dense (tensorize(model, rules={{'<its name>': "
        f"None, '*': {{}}}}); `tnk inspect` lists the names), or rebuild the dense weight explicitly with "
        f"layer.{dense_method}()"
    )

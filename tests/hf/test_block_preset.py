"""Preset block, BERT's default: a whole layer per slice with only its FFN tensorized; the slice's dense
attention and LayerNorms train with the MPO cores, and the result saves and loads like any checkpoint."""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import tnkernels
from distill.hf.flags import add_arguments
from distill.hf.models import base_model
from distill.hf.pipeline import compress_model
from distill.hf.presets import default_preset, slice_specs
from tests.helpers import assert_close_rel
from tests.hf.conftest import tiny_model
from tests.hf.test_presets_capture import padded_batches
from tnkernels.nn.mpo_linear import MPOLinear


def test_default_preset_is_block_for_bert_and_mlp_for_gpt2():
    assert default_preset(tiny_model("bert")) == "block"
    assert default_preset(tiny_model("gpt2")) == "mlp"
    assert [s.name for s in slice_specs(tiny_model("bert"), None)] == ["block0", "block1", "block2"]
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args("--model m --ratio 2 --out o".split())
    assert args.preset is None  # resolved per family by compress_model


def test_block_slices_train_attention_and_layernorms_and_reload(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_model("bert")
    with torch.no_grad():  # a random tiny BERT's FFNs are drowned by the residual; make them matter
        for layer in base_model(teacher).encoder.layer:
            layer.output.dense.weight.mul_(30.0)
    student = copy.deepcopy(teacher)
    rep = compress_model(
        student, padded_batches("bert", n_batches=4), tmp_path / "out", ratio=2.0, steps=30, lr=3e-3,
        device="cpu", progress=False,
    )  # fmt: skip
    assert rep["preset"] == "block" and [s["slice"] for s in rep["slices"]] == ["block0", "block1", "block2"]
    t_layers, s_layers = base_model(teacher).encoder.layer, base_model(student).encoder.layer
    for i, (t, s) in enumerate(zip(t_layers, s_layers, strict=True)):
        assert isinstance(s.intermediate.dense, MPOLinear) and isinstance(s.output.dense, MPOLinear)
        assert type(s.attention.self.query) is nn.Linear  # attention stays dense ...
        trained = {  # ... but it and the LayerNorms moved with the cores
            "query": (t.attention.self.query.weight, s.attention.self.query.weight),
            "attention LayerNorm": (t.attention.output.LayerNorm.weight, s.attention.output.LayerNorm.weight),
            "FFN LayerNorm": (t.output.LayerNorm.bias, s.output.LayerNorm.bias),
            "FFN bias": (t.intermediate.dense.bias, s.intermediate.dense.bias),
        }
        for what, (before, after) in trained.items():
            assert not torch.equal(before, after), f"layer {i}: {what} did not train"
        assert rep["slices"][i]["final_nmse"] < rep["slices"][i]["initial_nmse"], rep["slices"][i]
    # a skeleton with other random weights: everything, trained attention included, comes from the checkpoint
    torch.manual_seed(1)
    skeleton = base_model(tiny_model("bert"))
    loaded = tnkernels.load_compressed(skeleton, tmp_path / "out" / "compressed").eval()
    ids = padded_batches("bert", n_batches=1)[0]
    with torch.no_grad():
        assert_close_rel(
            loaded(**ids).last_hidden_state, base_model(student).eval()(**ids).last_hidden_state, 1e-5, "reload"
        )

"""What users do with a compressed Hugging Face model next: save_pretrained, meta-device skeletons, resizing.

Each test here failed before the fix it names (2026-12-02): save_pretrained wrote the factors and from_pretrained
rebuilt the layers dense and random with only a warning; a skeleton whose ties were lost (.to("meta"),
accelerate's init_empty_weights) did not load; code reading a tensorized layer's .weight did not learn its name.
"""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch

import tnkernels
from tests.hf.conftest import TINY, tiny_model

transformers = pytest.importorskip("transformers")


def _compressed(family: str):
    model = tiny_model(family)  # GPT-2 and Llama: the causal LM; BERT: the base model
    tnkernels.tensorize(model, ratio=2)
    return model


def _ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(2, vocab, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_save_pretrained_of_a_tensorized_model_is_refused(family, tmp_path):
    model = _compressed(family)
    with pytest.raises(ValueError, match=r"save_pretrained: \d+ layers are tensorized .*save_compressed"):
        model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    # every way of getting at a save_pretrained of the same model: its base model, a copy, a pickled copy
    inner = model.base_model if model.base_model is not model else None
    copies = [copy.deepcopy(model)]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies.append(torch.load(buf, weights_only=False))
    for other in [m for m in (inner, *copies) if m is not None]:
        with pytest.raises(ValueError, match="save_compressed"):
            other.save_pretrained(tmp_path / "other")
    assert copies[0].save_pretrained.model is copies[0]  # the copy's guard speaks for the copy

    # the documented path instead: save_compressed, then load_compressed into the original architecture
    tnkernels.save_compressed(model, tmp_path / "tt")
    again = tnkernels.load_compressed(tiny_model(family), tmp_path / "tt")
    with torch.no_grad():
        want, got = model(_ids()), again(_ids())
    key = "logits" if "logits" in want else "last_hidden_state"
    torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="save_compressed"):  # the loaded model is guarded as well
        again.save_pretrained(tmp_path / "hf")


def test_save_pretrained_works_again_once_the_layers_are_dense(tmp_path):
    model = _compressed("llama")
    for name, layer in list(model.named_modules()):
        if isinstance(layer, tnkernels.MPOLinear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.to_linear())
    model.save_pretrained(tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, model(_ids()).logits)


def _meta_skeleton_without_ties(cls, config):
    skeleton = cls(config).to("meta")  # as accelerate's init_empty_weights(): every parameter replaced alone
    every = [p for _, p in skeleton.named_parameters(remove_duplicate=False)]
    assert len({id(p) for p in every}) == len(every)  # the ties are really gone
    return skeleton


@pytest.mark.parametrize("arch", ["gpt2-lm", "bert-mlm"])
def test_load_into_a_meta_skeleton_that_lost_its_ties(arch, tmp_path):
    if arch == "gpt2-lm":
        cls, config = transformers.GPT2LMHeadModel, transformers.GPT2Config(**TINY["gpt2"])
        pairs = [("lm_head.weight", "transformer.wte.weight")]
    else:
        cls, config = transformers.BertForMaskedLM, transformers.BertConfig(**TINY["bert"])
        pairs = [
            ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
            ("cls.predictions.decoder.bias", "cls.predictions.bias"),
        ]
    torch.manual_seed(0)
    model = cls(config).eval()
    tnkernels.tensorize(model, ratio=2)
    tnkernels.save_compressed(model, tmp_path / "tt")
    loaded = tnkernels.load_compressed(_meta_skeleton_without_ties(cls, config), tmp_path / "tt").eval()
    params = dict(loaded.named_parameters(remove_duplicate=False))
    for a, b in pairs:
        assert params[a] is params[b], f"{a} and {b} are not tied again"
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)


def test_code_reading_the_weight_of_a_tensorized_layer_learns_its_name(tmp_path):
    lm = tiny_model("llama")  # untied lm_head: tensorize compresses it
    assert not lm.config.tie_word_embeddings
    tnkernels.tensorize(lm, ratio=2)
    with pytest.raises(AttributeError, match=r"the layer 'lm_head' .*rules=\{'lm_head': None"):
        lm.resize_token_embeddings(TINY["llama"]["vocab_size"] + 8)  # transformers reads lm_head.weight

    # loaded from a base-model checkpoint into the causal LM: the name as it is in the LM
    base = tiny_model("llama", causal_lm=False)
    tnkernels.tensorize(base, ratio=2)
    tnkernels.save_compressed(base, tmp_path / "tt")
    lm = tnkernels.load_compressed(tiny_model("llama"), tmp_path / "tt")
    with pytest.raises(AttributeError, match=r"the layer 'model\.layers\.0\.mlp\.down_proj'"):
        lm.model.layers[0].mlp.down_proj.weight  # noqa: B018


def test_the_save_pretrained_guard_does_not_keep_a_deleted_model_alive():
    """`del model` frees a model at once (GPU memory) only if nothing makes it part of a reference cycle."""
    model = _compressed("gpt2")
    alive = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert alive() is None
    finally:
        gc.enable()


def test_gpt2_layers_go_back_to_conv1d_and_reload_the_right_way_round(tmp_path):
    """to_linear()'s nn.Linear holds the transpose of Conv1D's weight: saved into a GPT-2 folder, a square layer
    (attn.c_proj) would reload transposed with no error. to_conv1d() gives back the layer GPT-2 expects."""
    model = _compressed("gpt2")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, tnkernels.MPOLinear)]
    assert any(m.in_features == m.out_features for _, m in layers)  # a square layer is in the test
    for name, layer in layers:
        parent, _, attr = name.rpartition(".")
        back = layer.to_conv1d()
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(back(x), layer(x), rtol=1e-5, atol=1e-5)
        setattr(model.get_submodule(parent), attr, back)
    model.save_pretrained(tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, model(_ids()).logits)


def test_the_pipelines_guard_save_pretrained_of_the_model_they_compress(tmp_path):
    """compress_model (the HF pipeline's Python API) puts tensorized slices into the caller's model in place, and
    distill() returns a student copied from a transformers teacher: neither had the save_pretrained guard, so
    the silent random-weights reload remained on these paths."""
    from distill.hf.pipeline import compress_model
    from distill.runner import distill
    from distill.train_slice import SliceTrainConfig
    from tests.hf.test_presets_capture import padded_batches

    model = tiny_model("bert")
    compress_model(
        model, padded_batches("bert", n_batches=2), tmp_path / "hf", ratio=2.0, preset="mlp", steps=0,
        device="cpu", progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="save_pretrained: .* layers are tensorized"):
        model.save_pretrained(tmp_path / "saved")

    teacher = tiny_model("bert")
    batches = [{"input_ids": b["input_ids"]} for b in padded_batches("bert", n_batches=2)]

    def forward(m, batch, device):
        return m(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state

    student = distill(
        teacher, batches, slices=["encoder.layer.0"], ratio=2.0, out_dir=tmp_path / "d", forward_fn=forward,
        config=SliceTrainConfig(max_steps=1, eval_every=1, batch_size=4), progress=False,
    ).student  # fmt: skip
    with pytest.raises(ValueError, match="save_pretrained: .* layers are tensorized"):
        student.save_pretrained(tmp_path / "saved2")

"""load_compressed into a skeleton built on the meta device: no memory for the dense weights it replaces.

Copying into a meta tensor is a silent no-op, so before this path existed such a load "succeeded" and the model
failed at its first forward. Every test compares the outputs with the model that was saved."""

import copy
import json

import pytest
import torch
import torchvision

from tnkernels import MPOLinear, TuckerConv2d, load_compressed, save_compressed, tensorize


def _all_real(model: torch.nn.Module) -> bool:
    return not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_resnet_meta_skeleton_loads_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    tensorize(model, ratio=4)
    save_compressed(model, tmp_path / "ckpt")
    with torch.device("meta"):
        skeleton = torchvision.models.resnet18(num_classes=10)
    restored = load_compressed(skeleton, tmp_path / "ckpt").eval()
    assert _all_real(restored) and isinstance(restored.fc, MPOLinear)
    assert all(p.requires_grad for p in restored.parameters())  # trainable, as a plain load leaves them
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    restored(x).sum().backward()
    assert restored.fc.cores[0].grad is not None


def _hf():
    return pytest.importorskip("transformers")


def _tiny(kind: str):
    transformers = _hf()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
        return cfg, transformers.GPT2LMHeadModel
    if kind == "bert":
        cfg = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100
        )
        return cfg, transformers.BertModel
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    return cfg, transformers.LlamaModel


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_hf_meta_skeleton(kind, tmp_path):
    """GPT-2's tied lm_head stays tied to the loaded embedding; BERT's position ids and Llama's rotary
    frequencies (non-persistent buffers, absent from state_dict) come from the checkpoint's buffers file."""
    cfg, cls = _tiny(kind)
    model = cls(cfg).eval()
    tensorize(model, ratio=2)
    save_compressed(model, tmp_path / "ckpt")
    with torch.device("meta"):
        skeleton = cls(cfg)
    restored = load_compressed(skeleton, tmp_path / "ckpt").eval()
    assert _all_real(restored)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        out, expected = restored(ids), model(ids)
    key = "logits" if kind == "gpt2" else "last_hidden_state"
    assert torch.equal(out[key], expected[key])
    if kind == "gpt2":
        assert restored.lm_head.weight is restored.transformer.wte.weight


def test_meta_skeleton_missing_values_are_named(tmp_path):
    """What the checkpoint cannot fill is an error naming it, not a model that fails later: a base model's
    checkpoint leaves an untied head empty, and a checkpoint without the buffers file (written before it
    existed) leaves the non-persistent buffers empty."""
    transformers = _hf()
    cfg, cls = _tiny("llama")
    model = cls(cfg).eval()
    tensorize(model, ratio=2)
    save_compressed(model, tmp_path / "ckpt")
    with torch.device("meta"):
        causal_lm = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"meta-device skeleton have no value.*lm_head\.weight"):
        load_compressed(causal_lm, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "buffers.safetensors").unlink()
    spec_file = tmp_path / "ckpt" / "spec.json"
    spec = json.loads(spec_file.read_text())
    with pytest.raises(ValueError, match="buffers.safetensors is missing"):
        load_compressed(cls(cfg), tmp_path / "ckpt")
    del spec["buffers_sha256"]
    spec_file.write_text(json.dumps(spec))
    with torch.device("meta"):
        skeleton = cls(cfg)
    with pytest.raises(ValueError, match=r"rotary_emb\.(original_)?inv_freq"):
        load_compressed(skeleton, tmp_path / "ckpt")
    assert torch.is_tensor(load_compressed(cls(cfg), tmp_path / "ckpt").rotary_emb.inv_freq)  # real skeleton: fine


def test_meta_skeleton_of_another_model_is_refused(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    tensorize(model, ratio=4)
    save_compressed(model, tmp_path / "ckpt")
    with torch.device("meta"):
        other = torchvision.models.resnet18(num_classes=10)
    other.add_module("extra", torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match="do not fit the skeleton"):
        load_compressed(other, tmp_path / "ckpt")


def test_decomposing_a_meta_weight_is_a_clear_error():
    with pytest.raises(ValueError, match="meta device and has no values to decompose"):
        MPOLinear.from_linear(torch.nn.Linear(64, 96, device="meta"), ratio=2)
    with pytest.raises(ValueError, match="meta device and has no values to decompose"):
        TuckerConv2d.from_conv(torch.nn.Conv2d(8, 8, 3, device="meta"), ratio=2)
    with pytest.raises(ValueError, match=r"tensorize: layer '0' .*meta device"):
        tensorize(torch.nn.Sequential(torch.nn.Linear(64, 96, device="meta")), ratio=2)


def test_reader_matches_safetensors_and_aligns(tmp_path):
    """The meta path reads safetensors files itself, into torch's (64-byte aligned) buffers: every dtype it
    knows, empty tensors, and (left to safetensors) one it does not know, each equal to what was saved."""
    from safetensors.torch import save_file

    from tnkernels.convert.skeleton_load import _owned

    saved = {
        "f32": torch.randn(5, 3),
        "bf16": torch.arange(7).bfloat16(),
        "i64": torch.arange(4),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),  # not in the reader's table: safetensors reads it
    }
    save_file(saved, str(tmp_path / "t.safetensors"))
    read = _owned(tmp_path / "t.safetensors")
    assert read.keys() == saved.keys()
    for key, value in saved.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key].float(), value.float()), key
        assert read[key].numel() == 0 or read[key].data_ptr() % 64 == 0, key


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float64])
def test_a_checkpoint_loads_in_the_skeletons_dtype_on_dense_and_meta_skeletons(saved, tmp_path):
    """A bf16 checkpoint in a float32 skeleton: the tensorized layers were rebuilt in the file's dtype and the dense
    ones cast to the skeleton's, a model that no input dtype could run; on a meta skeleton everything kept the
    file's dtype (found 2026-12-02). Both now give the skeleton's dtype, as load_state_dict does."""

    def net():
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Conv1d(32, 8, 1))

    model = net()
    tensorize(model, ratio=2, rules={"0": {}})
    save_compressed(model.to(saved), tmp_path / "ckpt")
    dense = load_compressed(net(), tmp_path / "ckpt")
    with torch.device("meta"):
        skeleton = net()
    meta = load_compressed(skeleton, tmp_path / "ckpt")
    for loaded in (dense, meta):
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    x = torch.randn(3, 16)
    assert torch.equal(dense[:2](x), meta[:2](x))
    expected = copy.deepcopy(model[0]).float()(x)  # the saved values cast to float32
    torch.testing.assert_close(dense[0](x), expected)

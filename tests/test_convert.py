"""tensorize() on real architectures, compressed checkpoints, and bad input."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tnkernels import MPOLinear, TuckerConv2d, load_compressed, save_compressed, tensorize
from tnkernels.convert import io as ckpt_io


@pytest.fixture(scope="module")
def resnet_pair(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet34(num_classes=10).eval()
    report = tensorize(model, ratio=4)
    path = save_compressed(model, tmp_path_factory.mktemp("ckpt") / "resnet34")
    return model, report, path


def test_resnet34_tensorize_report(resnet_pair):
    model, report, _ = resnet_pair
    convs = [r for r in report.rows if r.kind == "tucker"]
    assert len(convs) == 36 and all(r.ratio >= 4 for r in report.tensorized)
    assert all(r.rel_error is not None and 0 <= r.rel_error < 1 for r in report.tensorized)
    assert isinstance(model.layer1[0].conv1, TuckerConv2d) and isinstance(model.fc, MPOLinear)
    assert report.ratio >= 4
    text = str(report)
    assert "layer4.2.conv2" in text and "ratio" in text


def test_resnet34_save_load_bit_for_bit(resnet_pair):
    model, _, path = resnet_pair
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        skeleton = torchvision.models.resnet34(num_classes=10).eval()
        restored = load_compressed(skeleton, path)
        assert torch.equal(restored(x), expected)
    spec = json.loads((path / "spec.json").read_text())
    assert spec["layers"]["layer2.0.conv1"]["kind"] == "tucker_conv2d"
    assert spec["layers"]["layer2.0.conv1"]["stride"] == [2, 2]
    assert spec["layers"]["fc"]["kind"] == "mpo_linear" and "sha256" in spec


def test_corrupted_or_mismatched_checkpoint_is_refused(resnet_pair, tmp_path):
    _, _, path = resnet_pair
    with pytest.raises(ValueError, match="belongs to another model"):
        load_compressed(torchvision.models.resnet18(num_classes=10), path)
    with pytest.raises(ValueError, match="belongs to another model"):
        load_compressed(torchvision.models.resnet34(num_classes=100), path)
    with pytest.raises(ValueError, match="saved from a ResNet, the skeleton is a SqueezeNet"):  # names both
        load_compressed(torchvision.models.squeezenet1_0(num_classes=10), path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_compressed(torchvision.models.resnet34(num_classes=10), bad)
    (bad / "spec.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        load_compressed(torchvision.models.resnet34(num_classes=10), bad)
    with pytest.raises(ValueError, match="not a compressed checkpoint"):
        load_compressed(torchvision.models.resnet34(num_classes=10), tmp_path / "missing")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    tensorize(model, max_bond=2)
    target = tmp_path / "ckpt"
    save_compressed(model, target)
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, target)
    # the old checkpoint is intact and no temporary directory is left behind
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    return transformers, cfg, transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_tensorize_save_load(tmp_path):
    transformers, cfg, model = _tiny_gpt2()
    ids = torch.randint(0, 100, (2, 10))
    report = tensorize(model, ratio=2)
    names = {r.name: r for r in report.rows}
    assert names["transformer.h.0.mlp.c_fc"].tensorized
    assert isinstance(model.transformer.h[1].attn.c_attn, MPOLinear)
    assert not names["lm_head"].tensorized and "tied" in names["lm_head"].status
    with torch.no_grad():
        expected = model(ids).logits
        save_compressed(model, tmp_path / "gpt2")
        restored = load_compressed(transformers.GPT2LMHeadModel(cfg).eval(), tmp_path / "gpt2")
        assert torch.equal(restored(ids).logits, expected)


def test_gpt2_full_rank_tensorize_keeps_outputs():
    _, _, model = _tiny_gpt2()
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        tensorize(model)  # no rank selection: exact decompositions
        after = model(ids).logits
    assert (after - before).abs().max().item() < 1e-4 * before.abs().max().item()


def test_bert_tensorize():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    model = transformers.BertModel(cfg).eval()
    report = tensorize(
        model, ratio=2, rules={"encoder.layer.?.intermediate.dense": {}, "encoder.layer.?.output.dense": {}}
    )
    assert len(report.tensorized) == 4
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 7)))


def test_rules_select_override_and_exclude():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Conv2d(3, 8, 3))
    report = tensorize(model, ratio=2, rules={"0": {"ratio": 4}, "2": None, "3": {"ranks": (2, 2)}})
    rows = {r.name: r for r in report.rows}
    assert rows["0"].ratio >= 4 and rows["2"].status.startswith("skipped: excluded")
    assert isinstance(model[2], nn.Linear) and model[3].ranks == (2, 2)


def test_rules_convert_only_matches_and_the_first_match_wins():
    """The README's pattern: a catch-all last converts the rest with the keyword settings; without it, unmatched
    layers stay dense."""

    def net():
        return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 16))

    model = net()
    tensorize(model, ratio=2, rules={"0": None, "2": {"ratio": 4}, "*": {}})
    assert isinstance(model[0], nn.Linear)
    assert model[2].compression_ratio >= 4 and 2 <= model[3].compression_ratio < 4
    model = net()
    tensorize(model, ratio=2, rules={"2": {}})
    assert isinstance(model[0], nn.Linear) and isinstance(model[3], nn.Linear) and isinstance(model[2], MPOLinear)


class _FusedQKV(nn.Module):
    """Like torchvision's Swin attention: hands its children's weights to F.linear instead of calling them."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        return torch.nn.functional.linear(q * k + v, self.proj.weight, self.proj.bias)


class _DtypeCheckTwoLevelsUp(nn.Module):
    """Like Hugging Face ViT: the model reads `self.embed.patch.weight.dtype` of a grandchild."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Module()
        self.embed.patch = nn.Conv2d(3, 16, 2, stride=2)
        self.attn, self.head = _FusedQKV(), nn.Linear(16, 10)

    def forward(self, x):
        h = self.embed.patch(x.to(self.embed.patch.weight.dtype)).flatten(2).transpose(1, 2)
        return self.head(self.attn(h))


def test_layers_whose_weight_the_model_reads_stay_dense_with_the_reason():
    """Converted, they failed at the model's first forward (swin_t, HF ViT / CLIP / Mamba / T5, found 2026-12-02):
    the parent's or an ancestor's code reads their dense weight. They are left dense and reported; an exact rule
    naming one is an error that says why."""
    model = _DtypeCheckTwoLevelsUp()
    x = torch.randn(2, 3, 8, 8)
    report = tensorize(model, ratio=2)
    rows = {r.name: r for r in report.rows}
    assert isinstance(model.head, MPOLinear)  # called like a layer: converted
    for name, reader in (
        ("attn.qkv", "_FusedQKV.forward"),
        ("attn.proj", "_FusedQKV.forward"),
        ("embed.patch", "_DtypeCheckTwoLevelsUp.forward"),
    ):
        assert (
            rows[name].status
            == f"skipped: {reader} reads its dense .weight directly, which a tensorized layer does not have"
        )
    assert model(x).shape == (2, 16, 10)
    with pytest.raises(ValueError, match="layer 'attn.qkv' cannot be tensorized: _FusedQKV.forward reads its dense"):
        tensorize(_DtypeCheckTwoLevelsUp(), ratio=2, rules={"attn.qkv": {}})


def test_t5s_dtype_check_on_wo_no_longer_needs_a_rule():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)
    model = transformers.T5EncoderModel(config).eval()
    report = tensorize(model, ratio=2)
    assert [r.name for r in report.rows if "T5DenseActDense.forward reads" in r.status] == [
        "encoder.block.0.layer.1.DenseReluDense.wo"
    ]
    model(torch.randint(0, 50, (1, 5)))


def test_padding_mode_survives_tensorize_save_and_load(tmp_path):
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(8, 8, 3))

    model = net().eval()
    tensorize(model, ratio=2)
    assert isinstance(model[0], TuckerConv2d) and model[0].padding_mode == "reflect"
    save_compressed(model, tmp_path / "ckpt")
    restored = load_compressed(net().eval(), tmp_path / "ckpt")
    assert restored[0].padding_mode == "reflect" and restored[2].padding_mode == "zeros"
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(restored(x), model(x))


def test_a_compiled_or_data_parallel_model_saves_as_the_model_inside(tmp_path):
    """torch.compile and DataParallel prefix every name ("_orig_mod.", "module."): tensorize's rules still use the
    model's own names, the checkpoint loads into a plain skeleton, and a plain checkpoint into a compiled one."""

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10)).eval()

    model = net()
    compiled = torch.compile(model, backend="eager")
    report = tensorize(compiled, ratio=2, rules={"0": {"ratio": 2}, "3": None})  # names without "_orig_mod."
    assert [r.name for r in report.tensorized] == ["0"] and isinstance(model[0], TuckerConv2d)
    x = torch.randn(2, 3, 6, 6)
    for wrapper in (lambda m: torch.compile(m, backend="eager"), nn.DataParallel):
        save_compressed(wrapper(model), tmp_path / "ckpt")
        assert torch.equal(load_compressed(net(), tmp_path / "ckpt")(x), model(x))
    compiled_skeleton = torch.compile(net(), backend="eager")
    restored = load_compressed(compiled_skeleton, tmp_path / "ckpt")
    assert isinstance(restored._orig_mod[0], TuckerConv2d)
    assert torch.equal(restored._orig_mod(x), model(x))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # the dense teacher's fast path
def test_nn_transformer_encoder_runs_after_tensorize_and_reload(tmp_path):
    """nn.TransformerEncoderLayer's eval fast path reads linear1.weight for a fused kernel: after tensorize the
    layers must take their regular path (AttributeError before), with and without grad, and after a reload."""

    def encoder():
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()

    model = encoder()
    x = torch.randn(2, 6, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True  # a padding mask: the container's nested-tensor path too
    with torch.no_grad():
        want = model(x, src_key_padding_mask=pad)
    report = tensorize(model, rules={"*linear*": {"rel_tol": 1e-7}})  # (nearly) exact: outputs must match
    assert len(report.tensorized) == 4
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = model(x, src_key_padding_mask=pad)
        torch.testing.assert_close(got[~pad], want[~pad], rtol=1e-4, atol=1e-5)
    save_compressed(model, tmp_path / "ckpt")
    with torch.no_grad():
        again = load_compressed(encoder(), tmp_path / "ckpt")(x, src_key_padding_mask=pad)
    torch.testing.assert_close(again[~pad], want[~pad], rtol=1e-4, atol=1e-5)


def test_shared_module_is_converted_once():
    shared = nn.Linear(12, 12)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = tensorize(model, max_bond=2)
    assert len(report.tensorized) == 1
    assert model[0] is model[2] and isinstance(model[0], MPOLinear)


def test_tensorize_bad_input():
    model = nn.Sequential(nn.Linear(16, 16), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"rule 'lnear' matches no layer"):
        tensorize(model, ratio=2, rules={"lnear": {}})
    with pytest.raises(ValueError, match="must be > 1"):
        tensorize(model, ratio=1)
    with pytest.raises(ValueError, match="cannot be reached by any selected layer"):
        tensorize(nn.Sequential(nn.Linear(16, 16)), ratio=1e7)
    with pytest.raises(ValueError, match="layer '1' cannot be tensorized: grouped conv"):
        tensorize(model, ratio=2, rules={"1": {}})
    report = tensorize(model, ratio=2)  # default rules: the grouped conv is reported and left alone
    assert "grouped conv" in {r.name: r for r in report.rows}["1"].status
    nan_model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        nan_model[0].weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match="layer '0'.*NaN or Inf"):
        tensorize(nan_model, ratio=2)
    with pytest.raises(ValueError, match="unknown settings"):
        tensorize(nn.Sequential(nn.Linear(8, 8)), rules={"0": {"rank": 2}})
    twice = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    tensorize(twice, ratio=2)
    with pytest.raises(ValueError, match=r"no dense .* left; its 2 tensorized layers \(0, 2\) were tensorized before"):
        tensorize(twice, ratio=4)  # was an empty report: "0 layers tensorized"


def test_load_refuses_model_without_tensorized_layers(tmp_path):
    with pytest.raises(ValueError, match="no tensorized layers"):
        save_compressed(nn.Sequential(nn.Linear(4, 4)), tmp_path / "x")
    assert not Path(tmp_path / "x").exists()


def test_load_into_a_model_that_holds_the_saved_one(tmp_path):
    """A checkpoint of a submodule (a Hugging Face base model) loads into the model around it (the model with its
    head); the head keeps the skeleton's weights. Two candidate submodules are ambiguous: the usual error."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv2d(3, 8, 3))
    tensorize(body, ratio=2, rules={"0": {}, "2": {}})
    save_compressed(body, tmp_path / "body")
    skeleton = nn.ModuleDict(
        {"backbone": nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv2d(3, 8, 3)), "head": nn.Linear(32, 4)}
    )
    head_weight = skeleton["head"].weight.detach().clone()
    loaded = load_compressed(skeleton, tmp_path / "body")
    assert loaded is skeleton and isinstance(skeleton["backbone"][0], MPOLinear)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(skeleton["backbone"][0](x), body[0](x), rtol=0, atol=0)
    assert torch.equal(skeleton["head"].weight, head_weight)
    twins = nn.ModuleDict({k: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv2d(3, 8, 3)) for k in "ab"})
    with pytest.raises(ValueError, match="skeleton model lacks"):
        load_compressed(twins, tmp_path / "body")


def test_a_tensorized_model_larger_than_dense_is_warned_about():
    """tensorize(model) with no ratio keeps full ranks: exact, but larger and slower than the dense layers."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Flatten(), nn.Linear(32 * 4, 10))
    with pytest.warns(UserWarning, match=r"tensorize: 2 layer\(s\) now hold more weights than the dense ones"):
        tensorize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real compression says nothing
        tensorize(nn.Sequential(nn.Linear(64, 64)), ratio=2)


def test_load_compressed_can_override_the_saved_backend(tmp_path):
    """A model saved with backend='triton' (on a GPU) failed at its first call on a CPU without the interpreter;
    load_compressed(..., backend='auto') lets each layer pick. A bad name is refused before the skeleton changes."""

    def skeleton():
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Conv2d(4, 8, 3))

    model = skeleton()
    tensorize(model, ratio=2)
    for layer in (model[0], model[2]):
        layer.backend = "triton"
    save_compressed(model, tmp_path / "c")
    kept = load_compressed(skeleton(), tmp_path / "c")
    assert (kept[0].backend, kept[2].backend) == ("triton", "triton")
    restored = load_compressed(skeleton(), tmp_path / "c", backend="auto")
    assert (restored[0].backend, restored[2].backend) == ("auto", "auto")
    x, image = torch.randn(3, 32), torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(restored[0](x), model[0](x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored[2](image), model[2](image), rtol=1e-5, atol=1e-5)
    bare = skeleton()
    with pytest.raises(ValueError, match=r"load_compressed: backend must be one of .* got 'cuda'"):
        load_compressed(bare, tmp_path / "c", backend="cuda")
    assert isinstance(bare[0], nn.Linear) and isinstance(bare[2], nn.Conv2d)


def test_a_failing_layer_leaves_the_model_untouched():
    """tensorize swapped layers in as it went: a rule that fails at the conv (it has no native backend) left the
    Linear before it converted. Now nothing is swapped until every layer is built."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Conv2d(4, 8, 3))
    with pytest.raises(ValueError, match=r"layer '2' .*tucker_conv2d has no 'native' backend"):
        tensorize(model, ratio=2, rules={"*": {"backend": "native"}})
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Conv2d)


def test_tucker_layer_refuses_a_backend_it_lacks_when_built(tmp_path):
    """TuckerConv2d(backend='native') was accepted and failed at its first call; load_compressed(..., backend=
    'native') of a checkpoint with a conv is refused before the skeleton changes."""
    with pytest.raises(ValueError, match=r"TuckerConv2d: tucker_conv2d has no 'native' backend; use one of"):
        TuckerConv2d(4, 8, 3, ranks=(2, 2), backend="native")
    with pytest.raises(ValueError, match="has no 'native' backend"):
        TuckerConv2d.from_conv(nn.Conv2d(4, 8, 3), ratio=2, backend="native")
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Conv2d(4, 8, 3))
    tensorize(model, ratio=2)
    save_compressed(model, tmp_path / "c")
    bare = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Conv2d(4, 8, 3))
    with pytest.raises(ValueError, match=r"load_compressed: tucker_conv2d has no 'native' backend"):
        load_compressed(bare, tmp_path / "c", backend="native")
    assert isinstance(bare[0], nn.Linear)


@pytest.mark.parametrize("on_meta", [False, True], ids=["dense", "meta"])
def test_a_failed_load_leaves_the_skeleton_as_it_was(tmp_path, on_meta):
    """A checkpoint of another model (here: another head) was refused after the skeleton's layers had been
    swapped and the fitting weights copied in; the skeleton is now left as it was."""
    model = torchvision.models.resnet18(num_classes=10)
    tensorize(model, ratio=4, rules={"layer4.*": {}})
    save_compressed(model, tmp_path / "c")
    if on_meta:
        with torch.device("meta"):
            skeleton = torchvision.models.resnet18(num_classes=7)
    else:
        skeleton = torchvision.models.resnet18(num_classes=7)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    kinds = [type(m) for m in skeleton.modules()]
    with pytest.raises(ValueError, match="belongs to another model"):
        load_compressed(skeleton, tmp_path / "c")
    assert [type(m) for m in skeleton.modules()] == kinds
    after = skeleton.state_dict()
    if on_meta:  # nothing was assigned
        assert all(t.is_meta for t in after.values())
    else:
        assert all(torch.equal(before[k], after[k]) for k in before)

"""Presets, block-by-block capture and the attention-mask plumbing on tiny GPT-2 / BERT configs."""

from __future__ import annotations

import pytest
import torch

from distill.hf.capture import capture_features, load_slice_features
from distill.hf.models import base_model, block_names, family_of
from distill.hf.presets import PRESETS, bind_call, resolve, run_hf_slice, slice_specs
from tests.helpers import assert_close_rel
from tests.hf.conftest import TINY, tiny_model


def padded_batches(family: str, n_batches: int = 2, batch: int = 3, seq: int = 10) -> list[dict]:
    """Random token batches whose rows have different real lengths. Left padding: under GPT-2's causal
    mask real tokens never see right padding, so only left padding makes the mask matter in both families."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, TINY[family]["vocab_size"], (batch, seq), generator=g)
        lengths = torch.tensor([seq, seq - 3, seq - 6])[:batch]
        mask = (torch.arange(seq)[None, :] >= seq - lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_names_real_consecutive_modules(family, preset):
    model = tiny_model(family)
    specs = slice_specs(model, preset, group_size=2)
    n = len(block_names(model))
    assert len(specs) == (n if preset != "group" else (n + 1) // 2)
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        mods = resolve(model, s)
        assert len(mods) == len(s.modules) >= 1
    if preset == "group":  # groups cover every block once, in order, the last one shorter
        assert [m for s in specs for m in s.modules] == block_names(model)
        assert len(specs[-1].modules) == 1


@pytest.mark.parametrize("preset", PRESETS)
def test_captured_features_replay_through_the_slice(family, preset, tmp_path):
    """x, kwargs captured by hooks reproduce y when the slice is run alone: the slice contract holds."""
    model = tiny_model(family)
    specs = slice_specs(model, preset)
    stats = capture_features(model, specs, padded_batches(family), tmp_path, progress=False)
    assert stats["batches"] == 2
    for s in specs:
        data = load_slice_features(tmp_path, s.name)
        assert len(data) == 2
        with torch.no_grad():
            for d in data:
                assert_close_rel(run_hf_slice(resolve(model, s), d["x"], d["kwargs"]), d["y"], 1e-5, s.name)


@pytest.mark.parametrize("preset", ["block", "group"])
def test_padded_batch_slice_output_equals_full_model_intermediate(family, preset, tmp_path):
    """A block slice replayed from captured inputs gives the full model's hidden state after that block, on a
    padded batch; dropping the captured attention mask changes the result (so the mask really travels)."""
    model = tiny_model(family)
    batches = padded_batches(family, n_batches=1)
    specs = slice_specs(model, preset, group_size=2)
    capture_features(model, specs, batches, tmp_path, progress=False)
    with torch.no_grad():
        hidden = base_model(model)(**batches[0], output_hidden_states=True).hidden_states
    mask = batches[0]["attention_mask"].bool()
    for s in specs:
        d = load_slice_features(tmp_path, s.name)[0]
        assert "attention_mask" in d["kwargs"], f"{s.name}: attention mask not captured: {list(d['kwargs'])}"
        last = block_names(model).index(s.modules[-1])
        want = hidden[last + 1]
        if family in ("gpt2", "llama") and last + 1 == len(hidden) - 1:
            continue  # a decoder's last hidden state has the final norm applied; earlier ones are raw block outputs
        without_mask = {k: v for k, v in d["kwargs"].items() if k != "attention_mask"}  # Llama needs the rest
        with torch.no_grad():
            got = run_hf_slice(resolve(model, s), d["x"], d["kwargs"])
            unmasked = run_hf_slice(resolve(model, s), d["x"], without_mask)
        assert_close_rel(got[mask], want[mask], 1e-5, f"{s.name} vs full model")
        assert (unmasked[mask] - want[mask]).abs().max() > 1e-4, "the mask made no difference: test is vacuous"


def test_bind_call_names_positional_mask(family):
    """transformers 5.x passes the mask positionally; bind_call gives it its name and drops caches/flags."""
    model = tiny_model(family)
    block = base_model(model).get_submodule(block_names(model)[0])
    x = torch.randn(2, 4, 32)
    mask = torch.zeros(2, 1, 4, 4)
    if family == "gpt2":
        got_x, kw = bind_call(block, (x, None, mask, None), {"use_cache": False, "position_ids": torch.arange(4)})
        assert set(kw) == {"attention_mask", "position_ids"}
    elif family == "distilbert":  # its Transformer calls layer(hidden_states, attention_mask, **kwargs)
        got_x, kw = bind_call(block, (x, mask), {"output_attentions": False})
        assert set(kw) == {"attention_mask"}
    else:
        got_x, kw = bind_call(block, (x, mask, None), {"encoder_attention_mask": None})
        assert set(kw) == {"attention_mask"}
    assert got_x is x and kw["attention_mask"] is mask


def test_bert_mlp_slice_feeds_residual(tmp_path):
    """BertOutput takes the FFN input as its residual: run_hf_slice must equal feed_forward_chunk."""
    model = tiny_model("bert")
    layer = model.encoder.layer[1]
    a = torch.randn(2, 5, 32)
    spec = slice_specs(model, "mlp", layers=[1])[0]
    with torch.no_grad():
        assert_close_rel(run_hf_slice(resolve(model, spec), a, {}), layer.feed_forward_chunk(a), 1e-6, "bert ffn")


def test_bad_inputs_raise_value_error():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="preset"):
        slice_specs(model, "layer")
    with pytest.raises(ValueError, match="out of range"):
        slice_specs(model, "mlp", layers=[7])
    with pytest.raises(ValueError, match="group_size"):
        slice_specs(model, "group", group_size=0)
    with pytest.raises(ValueError, match="no complete features"):
        load_slice_features("/nonexistent-store", "mlp0")
    with pytest.raises(ValueError, match="not supported"):
        family_of(torch.nn.Linear(2, 2))


def test_capture_stops_after_last_needed_block_and_skips_finished_slices(tmp_path):
    """Only the blocks up to the last requested slice run; a second call finds the slices complete and
    captures nothing; the per-batch boundary activations are deleted at the end (disk holds features only)."""
    model = tiny_model("gpt2")
    specs = slice_specs(model, "mlp", layers=[0, 1])
    seen_blocks = []
    stats = capture_features(
        model, specs, padded_batches("gpt2"), tmp_path, progress=False, on_block=seen_blocks.append
    )
    assert stats["blocks_run"] == 2 and seen_blocks == [0, 1], "block 2 holds no requested slice"
    assert stats["bytes_written"] > 0
    assert not (tmp_path / "_boundary").exists()
    again = capture_features(model, specs, padded_batches("gpt2"), tmp_path, progress=False)
    assert again == {"batches": 0, "blocks_run": 0, "bytes_written": 0}


def test_capture_redoes_a_slice_left_incomplete_by_a_killed_run(tmp_path):
    model = tiny_model("gpt2")
    spec = slice_specs(model, "mlp", layers=[1])
    capture_features(model, spec, padded_batches("gpt2"), tmp_path, progress=False)
    want = load_slice_features(tmp_path, "mlp1")
    (tmp_path / "mlp1" / "DONE").unlink()  # as if killed before the slice finished
    (tmp_path / "mlp1" / "y0.pt").write_bytes(b"half-written")
    stats = capture_features(model, spec, padded_batches("gpt2"), tmp_path, progress=False)
    assert stats["batches"] == 2
    got = load_slice_features(tmp_path, "mlp1")
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g["y"], w["y"]) and torch.equal(g["x"], w["x"])


def test_fp16_store_halves_features_but_keeps_masks_exact(family, tmp_path):
    """float16 features, but the attention mask is stored as captured: fp16 would turn its large negative
    fill value into -inf and change the attention."""
    model = tiny_model(family)
    specs = slice_specs(model, "block", layers=[1])
    capture_features(model, specs, padded_batches(family), tmp_path / "f32", progress=False)
    capture_features(model, specs, padded_batches(family), tmp_path / "f16", store_dtype=torch.float16, progress=False)
    name = specs[0].name
    raw32 = torch.load(tmp_path / "f32" / name / "x0.pt", weights_only=True)
    raw16 = torch.load(tmp_path / "f16" / name / "x0.pt", weights_only=True)
    assert raw32["x"].dtype == torch.float32 and raw16["x"].dtype == torch.float16
    assert raw16["kwargs"]["attention_mask"].dtype == raw32["kwargs"]["attention_mask"].dtype
    assert torch.equal(raw16["kwargs"]["attention_mask"], raw32["kwargs"]["attention_mask"])
    d16 = load_slice_features(tmp_path / "f16", name)[0]
    assert d16["x"].dtype == torch.float32  # cast back for training
    assert_close_rel(d16["x"], raw32["x"], 1e-3, "fp16 round trip")

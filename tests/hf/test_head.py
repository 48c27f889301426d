"""The LM head as a last slice (--head): KL to the dense head, whitened init, pipeline, save/load, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import tnkernels
from distill.hf import evaluate
from distill.hf.head import _kl, capture_head_inputs, distill_head, install_head, output_head
from distill.hf.models import load_hf_model
from distill.hf.pipeline import calibration_data, compress_hf
from distill.hf.whiten import whitened_lowrank
from tests.hf.conftest import tiny_model
from tests.hf.test_pipeline import _args


def _peaky_gpt2():
    """A tiny GPT-2 whose head gives confident predictions (random init gives near-uniform ones, KL ~ 0)."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20.0)  # tied: the head's weight too
    return model


def _calib(n=6, t=12, vocab=256):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, vocab, (2, t), generator=g)} for _ in range(n)]


def test_kl_matches_float64_definition():
    s, t = torch.randn(7, 11, dtype=torch.float64), torch.randn(7, 11, dtype=torch.float64)
    p = t.softmax(-1)
    want = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(_kl(s, t), want)
    assert _kl(t, t).abs() < 1e-12


def test_distill_head_lowers_kl_and_leaves_the_model_alone():
    model = _peaky_gpt2()
    calib = _calib(40)  # 960 tokens: with a few hundred the held-out tenth stops improving at once (overfitting)
    x = capture_head_inputs(model, calib)
    assert x.shape == (40 * 2 * 12, model.config.n_embd)
    student, stats = distill_head(model, calib, ratio=4, steps=100, lr=3e-2, batch_tokens=64)
    assert isinstance(student, tnkernels.MPOLinear) and student.compression_ratio >= 4
    assert stats["final_kl"] < 0.7 * stats["initial_kl"], stats
    assert isinstance(model.lm_head, torch.nn.Linear)  # not installed by distill_head
    # on all the captured tokens, the trained head is closer to the dense one than its whitened starting point
    with torch.no_grad():
        dense = F.linear(x, model.lm_head.weight)
        start = whitened_lowrank(model.lm_head, x.double().T @ x.double(), len(x), ratio=4)
        assert _kl(student(x), dense) < 0.7 * _kl(start(x), dense)
    install_head(model, student)
    assert model.lm_head is student and not model.config.tie_word_embeddings
    assert model.transformer.wte.weight.shape == (256, model.config.n_embd)  # the embedding stays dense


def test_encoders_have_no_head():
    with pytest.raises(ValueError, match="no dense lm_head"):
        output_head(tiny_model("bert"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pipeline_head_slice_saves_the_whole_lm_and_resumes(family, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report = compress_hf(_args(tiny_dir, out, "--head"))
    assert report["head"] and report["slices"][-1]["slice"] == "lm_head"
    assert report["params_after"] < report["params_before"]
    loaded = tnkernels.load_compressed(AutoModelForCausalLM.from_pretrained(tiny_dir), out / "compressed").eval()
    assert isinstance(loaded.lm_head, tnkernels.MPOLinear)
    # the saved model is the one the pipeline measured: the same held-out perplexity
    _, tokenizer = load_hf_model(tiny_dir)
    held = calibration_data(family, tokenizer, seq_len=12, num_samples=8, batch_size=4)[1]
    with torch.no_grad():
        ppl = evaluate.perplexity(loaded, held)
    assert ppl == pytest.approx(report["metrics"]["student_perplexity"], rel=1e-5)
    from transformers import AutoConfig  # the same LM from a skeleton that never allocated its dense weights

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir))
    on_meta = tnkernels.load_compressed(skeleton, out / "compressed").eval()
    with torch.no_grad():
        assert evaluate.perplexity(on_meta, held) == pytest.approx(ppl, rel=1e-6)
    assert json.loads((out / "report.json").read_text())["head"] is True
    # a rerun trains nothing again, the head included
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "slices").iterdir()}
    compress_hf(_args(tiny_dir, out, "--head", "--no-eval"))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "slices").iterdir()} == mtimes


def test_head_flag_refused_for_encoders(tmp_path):
    bert_dir = tmp_path / "bert"
    tiny_model("bert").save_pretrained(bert_dir)
    from tests.hf.conftest import make_tokenizer

    make_tokenizer("bert").save_pretrained(bert_dir)
    with pytest.raises(ValueError, match="no dense lm_head"):
        compress_hf(_args(bert_dir, tmp_path / "out", "--head", "--no-eval"))
    assert not (tmp_path / "out" / "slices").exists() or not any((tmp_path / "out" / "slices").iterdir())

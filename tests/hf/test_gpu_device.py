"""The Hugging Face pipeline's GPU path without a GPU: device choice under torchrun, `tnk eval --device cuda`,
half-precision checkpoints, and the fake-CUDA harness (tests/distill/fake_cuda.py) around a whole run."""

from __future__ import annotations

import argparse

import pytest
import torch

from distill.hf.models import load_hf_model
from distill.hf.pipeline import compress_model, default_device
from tests.distill.fake_cuda import fake_cuda
from tests.hf.conftest import make_tokenizer, tiny_model
from tests.hf.test_presets_capture import padded_batches


def test_bare_cuda_under_torchrun_is_the_ranks_gpu(monkeypatch):
    # `torchrun --nproc_per_node 8 ... --device cuda` put every rank's model on GPU 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device("cuda") == torch.device("cuda", 1)
    assert default_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert default_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert default_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_is_loaded_in_float32(tmp_path, dtype):
    # transformers 5 loads a checkpoint in its own dtype; the pipeline's float32 features then met a bfloat16
    # model: "mat1 and mat2 must have the same dtype, but got Float and BFloat16" in the first slice
    d = tmp_path / "half"
    tiny_model("gpt2").to(dtype).save_pretrained(d)
    make_tokenizer("gpt2").save_pretrained(d)
    model, _ = load_hf_model(d)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    from distill.hf.pipeline import calibration_data

    _, tok = load_hf_model(d)
    calib, _ = calibration_data("gpt2", tok, seq_len=12, num_samples=4, batch_size=4)
    report = compress_model(model, calib, tmp_path / "out", ratio=2.0, steps=2, device="cpu", progress=False)
    assert report["num_slices"] == 3


@pytest.mark.parametrize("sequential", [True, False])
def test_whole_run_keeps_every_module_on_the_device(monkeypatch, tmp_path, sequential):
    """Every module that runs (teacher capture, whitening, training, sequential re-capture, rank 0's evaluation)
    is on the GPU; a regression guard, this path was already right."""
    model = tiny_model("llama")  # rotary position embeddings (a tuple of tensors) travel with the inputs
    calib = padded_batches("llama", n_batches=3)
    held = torch.randint(5, 200, (2, 12))
    with fake_cuda(monkeypatch) as rec:
        compress_model(
            model, calib, tmp_path, ratio=2.0, steps=3, device="cuda", sequential=sequential, held=held,
            progress=False,
        )  # fmt: skip
    assert not rec.off_gpu, rec.off_gpu


def test_tnk_eval_runs_on_the_requested_device(monkeypatch, tmp_path):
    # `tnk eval --model DIR --compressed OUT/compressed --device cuda` evaluated on the CPU, silently
    from distill.hf.eval_cmd import print_hf_eval

    d = tmp_path / "tiny"
    tiny_model("gpt2").save_pretrained(d)
    make_tokenizer("gpt2").save_pretrained(d)
    model, tok = load_hf_model(d)
    from distill.hf.pipeline import calibration_data

    calib, _ = calibration_data("gpt2", tok, seq_len=12, num_samples=4, batch_size=4)
    compress_model(model, calib, tmp_path / "out", ratio=2.0, steps=2, device="cpu", progress=False)
    args = argparse.Namespace(
        model=str(d), compressed=str(tmp_path / "out" / "compressed"), device="cuda", seq_len=12, text=None,
        threads=None, progress=False,
    )  # fmt: skip
    with fake_cuda(monkeypatch) as rec:
        assert print_hf_eval(args) == 0
    assert not rec.off_gpu, rec.off_gpu


def test_both_pipelines_share_the_torchrun_device_rule(monkeypatch):
    """The ResNet pipeline moved an explicit `--device cuda:0` to LOCAL_RANK's GPU where the Hugging Face one kept
    it; both now take distill/torchrun.py's rule (a bare cuda is the rank's GPU, an index is kept)."""
    from distill.torchrun import rank_device

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert [rank_device(d) for d in ("cuda", "cuda:0", "cpu")] == ["cuda:3", "cuda:0", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_device("cuda") == "cuda"

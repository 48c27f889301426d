"""`distill(..., device="cuda")` without a GPU: the fake-CUDA harness (tests/distill/fake_cuda.py) records every
module that runs while not on the GPU. Before 2026-12-02 the assembled student and sequential mode's hybrid
model got the trained slices on the CPU (checkpoints are loaded with map_location="cpu"), so a real CUDA run
crashed evaluating the student ("Expected all tensors to be on the same device"), and a `config` left at its
default device trained every slice on the CPU while the teacher ran on the GPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from distill.runner import distill
from distill.train_slice import SliceTrainConfig, train_slice
from tests.distill.fake_cuda import fake_cuda
from tests.distill.tiny import TinyResNet, calib_loader

CFG = dict(max_steps=4, eval_every=2, batch_size=16)


def _teacher() -> TinyResNet:
    torch.manual_seed(3)
    return TinyResNet(8).eval()


def _run(monkeypatch, tmp_path, *, config_device: str | None = "cuda", **kw):
    cfg = SliceTrainConfig(**CFG) if config_device is None else SliceTrainConfig(**CFG, device=config_device)
    with fake_cuda(monkeypatch) as rec:
        teacher = _teacher().to("cuda")
        res = distill(
            teacher, calib_loader(n=64, batch_size=16), ratio=2.0, out_dir=tmp_path, config=cfg, device="cuda",
            progress=False, **kw,
        )  # fmt: skip
        during = list(rec.off_gpu)
        rec.off_gpu.clear()
        with torch.no_grad():
            res.student(torch.randn(2, 3, 16, 16).to("cuda"))
        return res, during, list(rec.off_gpu)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_student_is_assembled_on_the_device(monkeypatch, tmp_path, mode):
    res, during, student = _run(monkeypatch, tmp_path, mode=mode)
    assert len(res.trained) == 4
    assert not student, f"the assembled student runs modules off the GPU: {student}"
    assert not during, f"modules ran off the GPU during the run: {during}"


def test_sequential_rerun_of_the_hybrid_model_stays_on_the_device(monkeypatch, tmp_path):
    # per-conv slices do not chain (a BN/ReLU sits between them): the hybrid model (teacher + the slices trained
    # so far) is run again for each slice, so the trained slices must be put in on the teacher's device
    res, during, student = _run(
        monkeypatch, tmp_path, mode="sequential", slices=["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1"]
    )
    assert not res.chained and len(res.trained) == 3
    assert not during, f"modules ran off the GPU during the run: {during}"
    assert not student


def test_config_left_at_its_default_trains_on_the_run_device(monkeypatch, tmp_path):
    # the docs' own example passes config=SliceTrainConfig(max_steps=...) without a device: with device="cuda"
    # the slices trained on the CPU (silently, while the teacher ran on the GPU)
    res, during, _ = _run(monkeypatch, tmp_path, config_device=None, mode="parallel")
    assert len(res.trained) == 4
    assert not during, f"slices trained off the GPU: {during}"


def test_config_device_alone_is_the_run_device(monkeypatch, tmp_path):
    # the other way round: config=SliceTrainConfig(device="cuda") and distill()'s device left at "cpu" captured
    # the teacher's features with CPU inputs for a GPU teacher
    cfg = SliceTrainConfig(**CFG, device="cuda")
    with fake_cuda(monkeypatch) as rec:
        seen = []
        teacher = _teacher().to("cuda")
        teacher.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
        real_to = torch.Tensor.to

        def to(self, *args, **kwargs):  # record where the batches are sent
            seen.append(torch._C._nn._parse_to(*args, **kwargs)[0])
            return real_to(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)
        distill(teacher, calib_loader(n=32, batch_size=16), ratio=2.0, out_dir=tmp_path, config=cfg, progress=False)
    devices = {d.type for d in seen if isinstance(d, torch.device)}
    assert devices == {"cuda"}, devices
    assert not rec.off_gpu


def test_a_bare_cuda_takes_the_other_sides_index():
    from distill.runner import _run_device

    assert _run_device("cuda", "cuda:1") == "cuda:1" and _run_device("cuda:1", "cuda") == "cuda:1"


def test_conflicting_devices_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cuda:1.*cuda:0|cuda:0.*cuda:1"):
        distill(
            _teacher(), calib_loader(n=32, batch_size=16), ratio=2.0, out_dir=tmp_path, device="cuda:0",
            config=SliceTrainConfig(**CFG, device="cuda:1"), progress=False,
        )  # fmt: skip


def test_training_loop_does_not_sync_every_step(tmp_path, monkeypatch):
    """float(loss) / loss.item() in the step loop waits for the GPU on every step (the CPU cannot queue the next
    step's kernels): the running loss is summed on the device and read only when it is reported."""
    from distill.capture import capture_features
    from distill.runner import _prepare
    from distill.slices import make_slices

    teacher = _teacher()
    spec = make_slices(teacher, ["layer1.0"])[0]
    store = capture_features(teacher, [spec], calib_loader(n=64, batch_size=8), progress=False)[spec.name]
    container = _prepare(teacher, spec, 2.0, None, 0)[0]
    reads = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item

    def counted(real):
        def read(t):
            caller = sys._getframe(1).f_code.co_filename
            # the slice trainer's reads (the store's and the optimizer's are of CPU tensors)
            if caller.endswith(os.path.join("distill", "train_slice.py")):
                reads.append(caller)
            return real(t)

        return read

    monkeypatch.setattr(torch.Tensor, "__float__", counted(real_float))
    monkeypatch.setattr(torch.Tensor, "item", counted(real_item))
    cfg = SliceTrainConfig(max_steps=40, eval_every=40, batch_size=8, val_fraction=0.0)
    result = train_slice(container, spec, store, config=cfg, progress=False, tensorized=True, params_before=1)
    assert result.steps == 40
    assert len(reads) < 10, f"{len(reads)} host reads of a device value in 40 steps"


@pytest.mark.parametrize("check", ["compress", "eval"])
def test_device_flag_is_checked_before_anything_slow(monkeypatch, check):
    """`tnk compress --device cuda` on a CPU-only machine, a GPU index the machine lacks, or a typo: one clear
    line up front (`tnk eval` / `tnk sensitivity` share setup_device); `cuda:1` on a one-GPU machine passed."""
    import argparse

    from distill.arg_checks import check_compress_args
    from distill.resnet_pipeline import setup_device

    def run(device):
        args = argparse.Namespace(device=device, threads=None)
        return check_compress_args(args) if check == "compress" else setup_device(args)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available here; use --device cpu"):
        run("cuda")
    with pytest.raises(ValueError, match="--device gpu: not a device"):
        run("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for ok in ("cpu", "cuda", "cuda:0"):
        run(ok)
    with pytest.raises(ValueError, match=r"--device cuda:1: this machine has 1 GPU\(s\), cuda:0 \.\.\. cuda:0"):
        run("cuda:1")

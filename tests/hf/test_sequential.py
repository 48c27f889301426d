"""Sequential mode of the HF pipeline: slice k is fitted to the inputs the compressed slices before it give."""

from __future__ import annotations

import copy

import pytest
import torch

from distill.hf.capture import capture_features, load_slice_features
from distill.hf.pipeline import compress_model
from distill.hf.presets import slice_specs
from tests.hf.conftest import tiny_model
from tests.hf.test_presets_capture import padded_batches


def _run(model, tmp_path, name, **kw):
    return compress_model(
        model, padded_batches("bert", n_batches=3), tmp_path / name, ratio=2.0, preset="mlp", steps=0,
        device="cpu", progress=False, **kw,
    )  # fmt: skip


def test_sequential_fits_later_slices_to_the_student_stream(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_model("bert")
    par, seq = copy.deepcopy(teacher), copy.deepcopy(teacher)
    rep_p = _run(par, tmp_path, "par", sequential=False)
    rep_s = _run(seq, tmp_path, "seq", sequential=True)
    assert rep_s["sequential"] and not rep_p["sequential"]
    core = "encoder.layer.{}.intermediate.dense.cores.0"
    sp, ss = par.state_dict(), seq.state_dict()
    torch.testing.assert_close(sp[core.format(0)], ss[core.format(0)])  # slice 0 sees the teacher's input
    assert not torch.allclose(sp[core.format(2)], ss[core.format(2)])  # later slices see the student's
    # slice 0's targets are the teacher's in both modes: its initial loss is identical
    assert rep_s["slices"][0]["initial_nmse"] == pytest.approx(rep_p["slices"][0]["initial_nmse"], rel=1e-6)


def test_sequential_targets_stay_the_teachers(tmp_path):
    """The student-stream capture replaces the inputs only: the targets are the teacher's slice outputs."""
    from distill.hf.pipeline import _student_inputs

    teacher = tiny_model("bert")
    spec = slice_specs(teacher, "mlp", layers=[1])[0]
    calib = padded_batches("bert", n_batches=2)
    capture_features(teacher, [spec], calib, tmp_path / "t", progress=False)
    data = load_slice_features(tmp_path / "t", spec.name)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.encoder.layer[0].output.dense.weight.mul_(0.5)  # a compressed slice 0 changes slice 1's input
    mixed = _student_inputs(student, spec, calib, tmp_path / "s", data, "cpu", False)
    for d, m in zip(data, mixed, strict=True):
        assert m["y"] is d["y"]
        assert not torch.allclose(m["x"], d["x"])


def test_sequential_refuses_several_ranks(tmp_path):
    with pytest.raises(ValueError, match="sequential"):
        _run(tiny_model("bert"), tmp_path, "x", sequential=True, rank=0, world=2)


def test_mode_defaults_sequential_on_one_process_and_parallel_under_torchrun():
    import argparse

    from distill.hf.pipeline import _sequential

    assert _sequential(argparse.Namespace(mode=None), 1) is True
    assert _sequential(argparse.Namespace(mode=None), 4) is False
    assert _sequential(argparse.Namespace(mode="parallel"), 1) is False
    assert _sequential(argparse.Namespace(mode="sequential"), 1) is True

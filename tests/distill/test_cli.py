"""`tnk compress` / `tnk eval` end to end on a tiny setup (resnet18, 8x8 digits, a few steps per slice)."""

from __future__ import annotations

import json

import pytest
import torch

import tnkernels
from distill.teacher import build_model, save_checkpoint
from tnkernels.cli import main


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "r18.pt"
    torch.manual_seed(0)
    save_checkpoint(build_model("resnet18", 10), path, model_name="resnet18", num_classes=10)
    return path


def test_compress_writes_outputs_and_eval_reads_them(tmp_path, r18_weights, capsys):
    out = tmp_path / "out"
    stale = out / ".compressed.tmp-killed"  # what a SIGKILL during save_compressed leaves behind
    stale.mkdir(parents=True)
    base = ["--model", "resnet18", "--weights", str(r18_weights), "--image-size", "8", "--no-progress"]
    rc = main(
        [
            "compress",
            *base,
            "--calib-fraction",
            "0.05",
            "--steps",
            "2",
            "--slices",
            "layer1",
            "layer2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert not stale.exists() and json.loads((out / "run.json").read_text()) == {"kind": "resnet"}
    assert (out / "compressed").stat().st_mode & 0o777 == 0o755  # 0755 / 0644, the modes of the other outputs
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in (out / "compressed").iterdir())
    report = json.loads((out / "report.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy", "ratio", "times", "slices_detail", "slicewise_seconds"):
        assert key in report
    assert set(report["slices_detail"]) == {"layer1", "layer2"}
    assert report["mode"] == "sequential"  # the default on one process
    assert report["ratio"] >= 1.9 and (out / "slice_losses.png").is_file() and (out / "accuracy_vs_ratio.png").is_file()
    student = tnkernels.load_compressed(build_model("resnet18", 10), out / "compressed")
    assert any(isinstance(m, tnkernels.TuckerConv2d) for m in student.modules())
    capsys.readouterr()
    assert main(["eval", *base, "--compressed", str(out / "compressed")]) == 0
    printed = capsys.readouterr().out
    assert f"{report['student_accuracy']:.4f}" in printed


def test_compress_bad_input_gives_clear_errors(tmp_path, r18_weights, capsys):
    base = ["compress", "--model", "resnet18", "--image-size", "8", "--no-progress", "--out", str(tmp_path)]
    cases = [
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--weights", str(r18_weights), "--slices", "layer5"], "unknown module name 'layer5'"),
        (
            ["--weights", str(r18_weights), "--ratio", "100000", "--slices", "layer1", "--calib-fraction", "0.05"],
            "cannot be reached",
        ),
        (["--model", "resnet34", "--weights", str(r18_weights)], "holds a 'resnet18' checkpoint"),
        (["--weights", str(r18_weights), "--budget", str(tmp_path / "none.json")], "--budget"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_sensitivity_budget_then_compress_with_budget(tmp_path, r18_weights, capsys):
    base = ["--model", "resnet18", "--weights", str(r18_weights), "--image-size", "8", "--no-progress"]
    layers = ["layer1.0.conv1", "layer1.0.conv2"]
    rc = main(
        [
            "sensitivity",
            *base,
            "--layers",
            *layers,
            "--ratios",
            "2",
            "4",
            "--calib-fraction",
            "0.05",
            "--target-ratio",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "sensitivity.json").is_file() and (tmp_path / "sensitivity.png").is_file()
    budget = tmp_path / "budget.json"
    assert set(json.loads(budget.read_text())["allocation"]) == set(layers)
    out = tmp_path / "c"
    rc = main(
        [
            "compress",
            *base,
            "--budget",
            str(budget),
            "--slices",
            "layer1.0",
            "--calib-fraction",
            "0.05",
            "--steps",
            "2",
            "--out",
            str(out),
            "--sensitivity",
            str(tmp_path / "sensitivity.json"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["ratio"] >= 2.0 - 1e-6 and report["ratio_requested"] is None
    assert (out / "sensitivity.png").is_file()  # --sensitivity FILE adds the heat map


def test_compress_with_the_global_baseline_reports_both_methods(tmp_path, r18_weights, capsys):
    """--global-baseline fine-tunes the same tensorized start end to end for as long as the slice-wise run took
    (with --kd-weight, against the teacher's logits too) and reports its accuracy beside the slice-wise one."""
    out = tmp_path / "out"
    flags = ["--model", "resnet18", "--weights", str(r18_weights), "--image-size", "8", "--no-progress"]
    flags += ["--calib-fraction", "0.05", "--steps", "2", "--slices", "layer1", "--out", str(out)]
    assert main(["compress", *flags, "--global-baseline", "--kd-weight", "0.5"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["global_accuracy"] <= 1.0 and report["global_history"]
    assert report["times"]["global_s"] > 0 and report["global_seconds"] <= report["times"]["global_s"] + 1e-6
    assert "global" in capsys.readouterr().out

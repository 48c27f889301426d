"""`tnk compress` rejects bad flags before anything slow: the message names the flag and the valid range."""

import pytest

import distill.cli
import distill.resnet_pipeline
from tnkernels.cli import build_parser, main


@pytest.fixture
def no_teacher(monkeypatch):
    """Fail the test if a teacher would be loaded or trained: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was requested before the flags were checked")

    monkeypatch.setattr(distill.resnet_pipeline, "teacher_from_args", refuse)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ratio", "0.5"], "--ratio must be > 1"),
        (["--ratio", "1"], "--ratio must be > 1"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--lr=-1e-3"], "--lr must be > 0"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--calib-fraction", "0"], "--calib-fraction must be in (0, 1]"),
        (["--calib-fraction", "1.5"], "--calib-fraction must be in (0, 1]"),
        (["--memory-budget-mb", "0"], "--memory-budget-mb must be > 0"),
        (["--max-seconds-per-slice", "-5"], "--max-seconds-per-slice must be > 0"),
        (["--teacher-epochs", "0"], "--teacher-epochs must be >= 1"),
        (["--head-lr", "0"], "--head-lr must be > 0"),
        (["--slices", "layer9.0"], "unknown module name 'layer9.0'"),
    ],
)
def test_bad_flags_fail_fast(no_teacher, capsys, tmp_path, flags, message):
    assert main(["compress", "--out", str(tmp_path / "out"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_typo_in_slice_suggests_names(no_teacher, capsys, tmp_path):
    assert main(["compress", "--out", str(tmp_path), "--slices", "layer1.O"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "layer1.0" in err, err


def test_help_shows_defaults_once_and_never_none():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("compress", "eval", "sensitivity"):
        text = " ".join(commands[name].format_help().split())
        assert "(default: None)" not in text, name
        assert "(default: True)" not in text and "(default: False)" not in text, name
    compress = " ".join(commands["compress"].format_help().split())
    assert "output folder (default: distill_out)" in compress
    assert compress.count("(default 2.0)") == 1 and "(default 2.0) (default" not in compress


@pytest.mark.parametrize("value", ["inf", "nan", "1e999"])
def test_ratio_must_be_finite(no_teacher, capsys, tmp_path, value):
    assert main(["compress", "--out", str(tmp_path / "out"), "--ratio", value]) == 2
    assert "--ratio must be > 1 and finite" in capsys.readouterr().err


def test_unreachable_ratio_is_refused_before_the_teacher(no_teacher, capsys, tmp_path):
    assert main(["compress", "--model", "resnet18", "--ratio", "1000", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--ratio 1000 cannot be reached by 12 sliced layer(s)" in err and "layer1.0.conv1" in err, err
    assert "use --ratio 42.4 or less" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_out_must_be_a_writable_folder(no_teacher, capsys, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["compress", "--out", str(afile)]) == 2
    assert f"--out {afile}: is a file, not a folder" in capsys.readouterr().err
    assert main(["compress", "--out", str(afile / "sub")]) == 2
    assert f"{afile} is a file, so the folder cannot be created" in capsys.readouterr().err
    import distill.out_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    real = distill.out_dir.os.access  # root ignores chmod: pretend the folder is read-only
    monkeypatch.setattr(distill.out_dir.os, "access", lambda p, m: False if str(p) == str(ro) else real(p, m))
    assert main(["compress", "--out", str(ro)]) == 2
    assert f"--out {ro}: not writable by this user" in capsys.readouterr().err
    assert main(["compress", "--out", str(ro / "x" / "y")]) == 2
    assert f"its parent {ro} is not writable" in capsys.readouterr().err


def test_hf_only_flags_are_refused_on_a_resnet(no_teacher, capsys, tmp_path):
    out = str(tmp_path / "o")
    assert main(["compress", "--out", out, "--text", "x.txt", "--preset", "attn", "--head"]) == 2
    err = capsys.readouterr().err
    assert "--preset, --head, --text apply only to Hugging Face models" in err, err
    assert main(["eval", "--seq-len", "64"]) == 2
    assert "--seq-len applies only to Hugging Face models" in capsys.readouterr().err


def test_resnet_run_refuses_a_hugging_face_out(no_teacher, capsys, tmp_path):
    (tmp_path / "run.json").write_text('{"kind": "hf", "fingerprint": "abc", "settings": {}}')
    assert main(["compress", "--model", "resnet18", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds the slices of another run (a Hugging Face run" in err and "use a fresh --out" in err, err
    legacy = tmp_path / "legacy"  # an HF folder from before run.json recorded the kind
    (legacy / "slices").mkdir(parents=True)
    (legacy / "slices" / "h.0.mlp.pt").write_bytes(b"")
    assert main(["compress", "--model", "resnet18", "--out", str(legacy)]) == 2
    assert "holds the slices of another run" in capsys.readouterr().err


def test_model_path_and_sensitivity_errors(no_teacher, capsys, tmp_path):
    assert main(["compress", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert f"--model {tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["sensitivity", "--model", str(hf), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "tnk sensitivity supports the torchvision ResNets only" in err and "config.json" not in err, err


def test_interrupt_ends_the_progress_line_first(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill.cli, "_compress", interrupted)
    assert main(["compress"]) == 130
    assert capsys.readouterr().err == "\ntnk compress: interrupted\n"


def test_help_describes_commands_with_examples_and_both_defaults():
    commands = build_parser()._subparsers._group_actions[0].choices
    compress = commands["compress"].format_help()
    assert "Slice-wise feature distillation" in compress and "`tnk compress` with no arguments" not in compress
    assert compress.count("tnk compress ") >= 3 and "examples:" in compress
    flat = " ".join(compress.split())
    assert "(default 200; HF: 100)" in flat and "(default 64; HF: 8)" in flat and "HF: 3e-4" in flat
    assert "ResNet models only" in flat and "Hugging Face models only" in flat
    for name in ("eval", "sensitivity"):
        text = commands[name].format_help()
        assert "examples:" in text and commands[name].description, name
    sens = " ".join(commands["sensitivity"].format_help().split())
    assert "Hugging Face folder holding config.json" not in sens
    assert "ratios each layer is scanned at (default: [2.0, 4.0, 8.0])" in sens
    assert "(default: 0.2)" in sens and "cpu (default) or cuda" in sens


def test_a_damaged_run_json_is_another_run_not_a_traceback(tmp_path):
    """A run.json that is not JSON (edited by hand, a disk full at write time) used to raise a bare
    JSONDecodeError from the fingerprint check; it is now treated as another run's, with the usual advice."""
    from distill.fingerprint import claim

    (tmp_path / "run.json").write_text('{"kind": "hf", "fingerp')
    with pytest.raises(ValueError, match="holds the slices of another run .*use a fresh --out DIR"):
        claim(tmp_path, "0123456789abcdef", {"ratio": 2.0})
    claim(tmp_path / "fresh", "0123456789abcdef", {"ratio": 2.0})  # a new folder is claimed
    claim(tmp_path / "fresh", "0123456789abcdef", {"ratio": 2.0})  # and the same run resumes in it

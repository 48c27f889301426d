"""`tnk compress` rejects bad flags before anything slow: the message names the flag and the valid range."""

import pytest

import distill.cli
from tnkernels.cli import build_parser, main


@pytest.fixture
def no_teacher(monkeypatch):
    """Fail the test if a teacher would be loaded or trained: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was requested before the flags were checked")

    monkeypatch.setattr(distill.cli, "_teacher", refuse)


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

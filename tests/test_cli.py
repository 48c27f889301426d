"""The `tnk` command line: help, inspect, and clear errors."""

import json

import pytest

from tnkernels.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "inspect" in out
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert sub.format_help().strip(), name


def test_inspect_resnet_subset(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    assert (
        main(
            [
                "inspect",
                "--model",
                "resnet18",
                "--ratio",
                "3",
                "--include",
                "layer1.*",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "tucker" in out and "whole model" in out
    data = json.loads(out_json.read_text())
    assert data["target_ratio"] == 3 and all(r["ratio"] >= 3 for r in data["rows"] if r["status"] == "tensorized")


def test_inspect_gpt2_config(capsys):
    pytest.importorskip("transformers")
    assert main(["inspect", "--model", "gpt2", "--ratio", "8", "--include", "transformer.h.0.mlp.c_proj"]) == 0
    assert "transformer.h.0.mlp.c_proj" in capsys.readouterr().out


def test_inspect_errors_are_clear(capsys, tmp_path):
    assert main(["inspect", "--model", "nosuchnet"]) == 2
    assert "unknown model 'nosuchnet'" in capsys.readouterr().err
    assert main(["inspect", "--model", "resnet18", "--weights", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["inspect", "--model", "resnet18", "--ratio", "0.5"]) == 2
    assert "must be > 1" in capsys.readouterr().err

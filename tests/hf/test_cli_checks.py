"""`tnk compress / eval` on a Hugging Face folder: bad inputs refused up front with one line naming the flag and
the fix, and a run leaves only its outputs (no token masks, no stale temporary folders, readable files)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf.conftest import make_tokenizer, tiny_model
from tnkernels.cli import main

FAST = ["--ratio", "2", "--steps", "2", "--seq-len", "12", "--num-samples", "4", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "gpt2"
    tiny_model("gpt2").save_pretrained(d)  # n_positions 64
    make_tokenizer("gpt2").save_pretrained(d)
    return d


def _fails(capsys, argv, message):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_inputs_refused_up_front(gpt2_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    base = ["compress", "--model", str(gpt2_dir), *FAST]
    _fails(capsys, [*base, "--workers", "2", "--slices", "h.0", "--global-baseline", "--out", out],
           "--slices, --workers, --global-baseline apply only to ResNet models")  # fmt: skip
    _fails(capsys, [*base, "--calib-fraction", "0.1", "--out", out], "--calib-fraction applies only to ResNet")
    _fails(capsys, [*base, "--seq-len", "65", "--out", out], "--seq-len 65 is longer than the model's 64 positions")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _fails(capsys, [*base, "--out", str(afile)], f"--out {afile}: is a file, not a folder")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"some text \xff\xfe\x00 more")
    _fails(capsys, [*base, "--text", str(binary), "--out", out], f"--text {binary}: not UTF-8 text")
    _fails(
        capsys,
        [*base, "--text", str(tmp_path), "--out", out],
        f"--text: calibration text file {str(tmp_path)!r} is a folder",
    )
    resnet_out = tmp_path / "r"
    resnet_out.mkdir()
    (resnet_out / "run.json").write_text('{"kind": "resnet"}')
    _fails(capsys, [*base, "--out", str(resnet_out)], "holds the slices of another run (a ResNet run")
    _fails(capsys, ["eval", "--model", str(gpt2_dir), "--compressed", out, "--seq-len", "100"], "--seq-len 100")
    assert not (tmp_path / "o").exists()


def test_broken_model_folders(gpt2_dir, tmp_path, capsys):
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((gpt2_dir / "config.json").read_text())
    _fails(capsys, ["compress", "--model", str(cfg_only), "--out", str(tmp_path / "o")],
           f"--model {cfg_only}: the folder has config.json but no weights")  # fmt: skip
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("nope")
    _fails(capsys, ["compress", "--model", str(bad), "--out", str(tmp_path / "o")],
           f"--model {bad}: {bad / 'config.json'} is not valid JSON")  # fmt: skip


def test_run_applies_threads_silences_bars_and_cleans_up(gpt2_dir, tmp_path, capfd, monkeypatch):
    out = tmp_path / "out"
    stale = out / ".compressed.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    threads = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (threads.append(n), real(n)))
    assert (
        main(["compress", "--model", str(gpt2_dir), *FAST, "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    )
    err = capfd.readouterr().err
    assert "Loading weights" not in err, err  # transformers' bar obeys --no-progress
    assert threads == [1]
    assert not stale.exists()  # a killed save's leftovers are removed
    assert not (out / "features").exists() or not any((out / "features").rglob("*.pt"))  # token masks too
    assert json.loads((out / "run.json").read_text())["kind"] == "hf"
    assert (out / "compressed").stat().st_mode & 0o777 == 0o755
    for f in (out / "compressed").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f

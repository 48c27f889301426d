"""A real kill test: `tnk compress` in a subprocess, SIGKILLed midway, then restarted.

The restarted run must (a) not retrain any slice whose checkpoint existed when the process died (the files stay
byte-identical and the report lists them as resumed) and (b) produce the same final model, bit for bit, as an
uninterrupted run with the same seed (single-threaded, so the float results do not depend on thread scheduling).
Tiny setup as in test_cli.py: a random resnet18 on 8x8 digits, its first three stages as three slices, 72
calibration images; sequential mode, so the restart also has to carry the student's inputs through the resumed
slices. Most of the time goes into starting Python (torch, torchvision, sklearn imports) twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tnkernels
from distill.teacher import build_model, save_checkpoint
from tnkernels.cli import main

ROOT = Path(__file__).resolve().parents[2]
SLICES = ["layer1", "layer2", "layer3"]


def _args(weights: Path, out: Path, mode: str) -> list[str]:
    return [
        "compress",
        "--model",
        "resnet18",
        "--weights",
        str(weights),
        "--image-size",
        "8",
        "--calib-fraction",
        "0.05",
        "--steps",
        "40",  # long enough that a slice takes a noticeable time, so the kill lands between checkpoints
        "--slices",
        *SLICES,
        "--mode",
        mode,
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _start(args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tnkernels.cli", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished(out: Path) -> dict[str, bytes]:
    """The slice checkpoints present now (temporary files of an interrupted write excluded), with their bytes."""
    d = out / "slices"
    return {p.stem: p.read_bytes() for p in sorted(d.glob("*.pt"))} if d.is_dir() else {}


def _kill_midway(proc: subprocess.Popen, out: Path, timeout_s: float = 240.0) -> dict[str, bytes]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = out / "slices"
        if d.is_dir() and any(d.glob("*.pt")):
            proc.send_signal(signal.SIGKILL)  # no clean-up handlers run: as hard as a power cut for the process
            proc.wait()
            return _finished(out)
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed (rc {proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no slice checkpoint appeared in time")


def _load_student(out: Path) -> dict[str, torch.Tensor]:
    return tnkernels.load_compressed(build_model("resnet18", 10), out / "compressed").state_dict()


def test_sigkill_midway_then_restart_matches_uninterrupted(tmp_path, capsys):
    weights = tmp_path / "r18.pt"
    torch.manual_seed(0)
    save_checkpoint(build_model("resnet18", 10), weights, model_name="resnet18", num_classes=10)
    killed, clean, mode = tmp_path / "killed", tmp_path / "clean", "sequential"

    before = _kill_midway(_start(_args(weights, killed, mode)), killed)
    assert 1 <= len(before) < len(SLICES), f"killed with {sorted(before)} finished: not midway"
    restarted = _start(_args(weights, killed, mode))
    # Meanwhile the uninterrupted reference runs here (single-threaded, like the subprocesses).
    assert main(_args(weights, clean, mode)) == 0
    capsys.readouterr()
    out, _ = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, out

    report = json.loads((killed / "report.json").read_text())
    # (a) nothing finished before the kill was trained again; everything else was.
    assert sorted(report["resumed_slices"]) == sorted(before)
    assert sorted(report["trained_slices"]) == sorted(set(SLICES) - set(before))
    after = _finished(killed)
    for name, blob in before.items():
        assert after[name] == blob, f"checkpoint of finished slice {name} was rewritten"
    # (b) the same final model as the uninterrupted run, bit for bit.
    a, b = _load_student(killed), _load_student(clean)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    assert json.loads((clean / "report.json").read_text())["resumed_slices"] == []

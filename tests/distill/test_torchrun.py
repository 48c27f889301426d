"""The torch.distributed path: 2 CPU ranks with gloo under torchrun, compared with a single-process run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.runner import distill
from distill.train_slice import SliceTrainConfig
from tests.distill.tiny import TinyResNet, calib_loader

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_match_single_process(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.fail("torchrun not found next to the Python interpreter; install torch with its scripts")
    result = tmp_path / "student.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "tests.distill.torchrun_worker",
            str(tmp_path / "out"),
            str(result),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(result, weights_only=False)
    other = torch.load(str(result) + ".rank1", weights_only=False)
    # Slices were shared out round-robin: rank 0 trained 0 and 2, rank 1 trained 1 and 3.
    assert sorted(got["trained0"]) == ["layer1.0", "layer2.0"]
    assert sorted(other["trained"]) == ["layer1.1", "layer3.0"]
    assert sorted(p.name for p in (tmp_path / "out" / "slices").glob("*.pt")) == [
        "layer1.0.pt",
        "layer1.1.pt",
        "layer2.0.pt",
        "layer3.0.pt",
    ]

    torch.manual_seed(3)
    teacher = TinyResNet(8).eval()
    single = distill(
        teacher,
        calib_loader(n=64, batch_size=16),
        ratio=2.0,
        out_dir=tmp_path / "single",
        config=SliceTrainConfig(max_steps=6, eval_every=3, batch_size=16),
        progress=False,
    )
    ref = single.student.state_dict()
    assert got["state"].keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(got["state"][k], v), f"{k} differs between torchrun and single-process runs"

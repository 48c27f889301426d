"""Runner: resume after a simulated kill, worker processes, modes, bad input, and a small convergence test."""

from __future__ import annotations

import pytest
import torch

import distill.runner as runner
import distill.sequential as sequential
from distill.runner import distill, tensorized_copy
from distill.teacher import evaluate
from distill.train_slice import SliceTrainConfig
from tests.distill.tiny import TinyResNet, calib_loader, held_out_loader, tiny_teacher

CFG = dict(max_steps=6, eval_every=3, batch_size=16)


def _random_teacher() -> TinyResNet:
    torch.manual_seed(3)
    return TinyResNet(8).eval()


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def test_resume_after_kill_redoes_nothing_and_matches(tmp_path, monkeypatch):
    teacher, loader = _random_teacher(), calib_loader(n=64, batch_size=16)
    full = distill(teacher, loader, ratio=2.0, out_dir=tmp_path / "a", config=SliceTrainConfig(**CFG), progress=False)
    assert sorted(full.trained) == ["layer1.0", "layer1.1", "layer2.0", "layer3.0"] and not full.resumed

    real, calls = runner.train_slice, []

    def dies_on_third(*args, **kwargs):
        calls.append(args[1].name)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_slice", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, loader, ratio=2.0, out_dir=tmp_path / "b", config=SliceTrainConfig(**CFG), progress=False)
    finished = calls[:2]
    # A half-written file from the kill must not be mistaken for a checkpoint.
    (tmp_path / "b" / "slices" / f".{calls[2]}.pt.999.tmp").write_bytes(b"partial")
    monkeypatch.setattr(runner, "train_slice", real)

    resumed = distill(
        teacher, loader, ratio=2.0, out_dir=tmp_path / "b", config=SliceTrainConfig(**CFG), progress=False
    )
    assert sorted(resumed.resumed) == sorted(finished)
    assert not set(resumed.trained) & set(finished) and len(resumed.trained) == 2
    _states_equal(resumed.student, full.student)  # bit for bit, same seed and thread count


def test_two_workers_equal_in_process(tmp_path):
    teacher, loader = _random_teacher(), calib_loader(n=64, batch_size=16)
    # Each of 2 workers gets torch.get_num_threads() // 2 threads; the in-process run must use the same count, or
    # kernels may split reductions differently and the two students differ in the last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        one = distill(
            teacher, loader, ratio=2.0, out_dir=tmp_path / "w1", config=SliceTrainConfig(**CFG), progress=False
        )
    finally:
        torch.set_num_threads(threads)
    two = distill(
        teacher, loader, ratio=2.0, out_dir=tmp_path / "w2", workers=2, config=SliceTrainConfig(**CFG), progress=False
    )
    assert sorted(two.trained) == sorted(one.trained)
    _states_equal(two.student, one.student)


def test_sequential_uses_student_inputs(tmp_path):
    teacher, loader = _random_teacher(), calib_loader(n=64, batch_size=16)
    cfg = SliceTrainConfig(**CFG)
    par = distill(teacher, loader, ratio=2.0, out_dir=tmp_path / "p", config=cfg, progress=False)
    seq = distill(teacher, loader, ratio=2.0, out_dir=tmp_path / "s", mode="sequential", config=cfg, progress=False)
    # The first slice sees the same (teacher) input in both modes; later slices see the student's own outputs.
    assert par.slices["layer1.0"].init_loss == seq.slices["layer1.0"].init_loss
    assert par.slices["layer1.1"].init_loss != seq.slices["layer1.1"].init_loss
    torch.testing.assert_close(seq.student.layer1[0].conv1.core, par.student.layer1[0].conv1.core, rtol=0, atol=0)
    # Consecutive blocks chain: their inputs come from running the trained upstream block, not the whole model.
    assert seq.chained == ["layer1.1", "layer2.0", "layer3.0"]


def test_sequential_chaining_equals_whole_model_pass(tmp_path, monkeypatch):
    """Carrying inputs slice to slice must give the same student as re-running the hybrid model for each slice."""
    teacher, loader = _random_teacher(), calib_loader(n=48, batch_size=16)
    cfg = SliceTrainConfig(**CFG)
    chained = distill(teacher, loader, ratio=2.0, out_dir=tmp_path / "c", mode="sequential", config=cfg, progress=False)
    monkeypatch.setattr(sequential, "_chains", lambda *a: False)
    rerun = distill(teacher, loader, ratio=2.0, out_dir=tmp_path / "r", mode="sequential", config=cfg, progress=False)
    assert rerun.chained == [] and len(chained.chained) == 3
    _states_equal(chained.student, rerun.student)


def test_bad_input(tmp_path):
    teacher, loader = _random_teacher(), calib_loader(n=32, batch_size=16)
    cfg = SliceTrainConfig(**CFG)
    with pytest.raises(ValueError, match="cannot be reached"):
        distill(teacher, loader, ratio=1e5, out_dir=tmp_path / "r", config=cfg, progress=False)
    with pytest.raises(ValueError, match="unknown module name 'layer9'"):
        distill(teacher, loader, slices=["layer9"], ratio=2.0, out_dir=tmp_path / "n", config=cfg, progress=False)
    with pytest.raises(ValueError, match="--workers 1"):
        distill(teacher, loader, ratio=2.0, mode="sequential", workers=2, out_dir=tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match="--ratio"):
        distill(teacher, loader, out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="--mode"):
        distill(teacher, loader, ratio=2.0, mode="both", out_dir=tmp_path / "x", progress=False)
    # A checkpoint folder from another setup (here: another ratio) is refused, not silently mixed in.
    distill(teacher, loader, slices=["layer1.0"], ratio=2.0, out_dir=tmp_path / "c", config=cfg, progress=False)
    with pytest.raises(ValueError, match="fresh --out"):
        distill(teacher, loader, slices=["layer1.0"], ratio=3.0, out_dir=tmp_path / "c", config=cfg, progress=False)


def test_disk_store_fp16_runs(tmp_path):
    teacher, loader = _random_teacher(), calib_loader(n=48, batch_size=16)
    res = distill(
        teacher,
        loader,
        slices=["layer2.0"],
        ratio=2.0,
        out_dir=tmp_path,
        fp16=True,
        memory_budget_bytes=20_000,
        config=SliceTrainConfig(**CFG),
        progress=False,
    )
    assert not (tmp_path / "features").exists()  # spilled shards are removed once the slice is trained
    assert res.slices["layer2.0"].steps > 0


def test_convergence_slice_wise_recovers_accuracy(tmp_path):
    """Like Liger's convergence tests: a small trained CNN, compressed 2x slice-wise. Each slice's held-out loss
    must drop well below the decomposition's, and the student must beat the untrained decomposition and stay
    near the teacher."""
    teacher = tiny_teacher(16)
    test = held_out_loader()
    t_acc = evaluate(teacher, test)
    assert t_acc > 0.85, f"the tiny teacher did not train ({t_acc:.3f}); the test would be meaningless"
    loader = calib_loader(n=512, batch_size=32)
    cfg = SliceTrainConfig(max_steps=80, eval_every=10, batch_size=64, lr=2e-3)
    res = distill(teacher, loader, ratio=2.0, out_dir=tmp_path, mode="sequential", config=cfg, progress=False)
    for name, r in res.slices.items():
        assert r.best_loss < 0.7 * r.init_loss, f"{name}: loss {r.init_loss:.4f} -> {r.best_loss:.4f}"
    s_acc = evaluate(res.student, test)
    d_acc = evaluate(tensorized_copy(teacher, "per-block", ratio=2.0), test)
    assert s_acc > d_acc, f"training did not help: {d_acc:.3f} (decomposition) -> {s_acc:.3f}"
    assert s_acc >= t_acc - 0.05, f"student {s_acc:.3f} too far below teacher {t_acc:.3f}"


@pytest.mark.slow
def test_worker_processes_leave_no_leaked_semaphore(tmp_path):
    """Python warned "resource_tracker: There appear to be 1 leaked semaphore objects" at the exit of every run with
    workers: the pool terminated its workers, so the semaphore of each worker's tqdm lock was never released. The
    warning is printed by the interpreter at exit, so the run is a subprocess."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(f"""
        import torch
        from torch import nn
        from distill.runner import distill
        from distill.train_slice import SliceTrainConfig

        if __name__ == "__main__":
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
            data = [torch.randn(8, 16) for _ in range(2)]
            distill(model, data, slices=["0", "2"], ratio=2, workers=2, out_dir={str(tmp_path / "out")!r},
                    config=SliceTrainConfig(max_steps=2, eval_every=1, batch_size=8), progress=False)
            print("finished")
    """)
    (tmp_path / "run.py").write_text(script)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(tmp_path / "run.py")], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr
    assert "leaked semaphore" not in done.stderr, done.stderr


def test_a_diverging_slice_stops_and_says_so():
    """lr 1e6 makes the loss non-finite: training used to spend `patience` more evaluations on NaN parameters and
    return the best state without a word. Now it stops at the first non-finite evaluation with a warning naming
    the slice and the fix, and keeps the best (finite) state."""
    from distill.capture import capture_features
    from distill.runner import _prepare
    from distill.slices import make_slices
    from distill.train_slice import train_slice
    from tests.distill.tiny import calib_loader

    teacher = _random_teacher()
    spec = make_slices(teacher, ["layer1.0"])[0]
    store = capture_features(teacher, [spec], calib_loader(n=64, batch_size=8), progress=False)[spec.name]
    container = _prepare(teacher, spec, 2.0, None, 0)[0]
    cfg = SliceTrainConfig(max_steps=200, eval_every=5, batch_size=8, lr=1e6, patience=10)
    with pytest.warns(RuntimeWarning, match=r"slice layer1\.0: the loss became .* lower the learning rate"):
        result = train_slice(container, spec, store, config=cfg, progress=False, tensorized=True, params_before=1)
    assert result.steps <= 10
    assert all(torch.isfinite(p).all() for p in container.parameters())
    assert result.best_loss == result.init_loss

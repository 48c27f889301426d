"""Concurrency and the shared cache folder: threads calling one model, processes starting together on an empty
cache (torchrun ranks, test workers), damaged or unwritable cache files, fork after use, and a recalibration or
option change racing a first call (tnkernels/plan/disk.py, docs/planner.md "The cache folder, processes and threads").
Whatever could hang runs in a subprocess or thread with a timeout, so a hang fails instead of blocking CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

from tnkernels.nn import MPOLinear, TuckerConv2d
from tnkernels.plan import cache, calibrate
from tnkernels.plan.calibrate import Calibration, MachineStore, machine_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_calibration(overhead: float = 1e-6) -> Calibration:
    rates = {1: 1e9, 4: 4e9, 16: 1.6e10, 64: 5e10, 256: 1e11}
    return Calibration("cpu", "torch.float32", overhead, 1e10, rates, dram_bandwidth=5e9, bmm_rates=dict(rates),
                       n_rates=dict(rates), m_rates=dict(rates), conv_scale={"1x1": 1.0, "kxk": 1.0})  # fmt: skip


def _run_together(script: str, n: int, cache_dir, timeout: float = 60) -> list[dict]:
    """Start `n` interpreters running `script`, which calls together() once its imports are done: it returns when
    all `n` have got there, so the rest runs at the same time in every process. Their last stdout line, as JSON."""
    env = dict(os.environ, TNK_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT, N=str(n), READY=str(cache_dir / "ready"))
    code = _TOGETHER + textwrap.dedent(script)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process hung")
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


_TOGETHER = """
import os, time
def together():
    os.makedirs(os.environ["READY"], exist_ok=True)
    open(os.path.join(os.environ["READY"], str(os.getpid())), "w").close()
    deadline = time.time() + 30
    while len(os.listdir(os.environ["READY"])) < int(os.environ["N"]) and time.time() < deadline:
        time.sleep(0.005)
"""


def test_processes_writing_together_keep_every_entry(tmp_path):
    # A read-modify-write without the folder's lock lost entries: 4 x 200 puts kept 508 of 800 (3 x 100 here).
    _run_together(
        """
        from tnkernels.plan.calibrate import MachineStore
        store = MachineStore("stress.json")
        together()
        for i in range(100):
            store.put(f"{os.getpid()}-{i}", i)
        print("{}")
        """,
        3,
        tmp_path,
    )
    # the subprocesses' machine key (their thread count may differ from this process's): the file's only one
    (stored,) = json.loads((tmp_path / "stress.json").read_text()).values()
    assert len(stored) == 300
    assert sorted(os.listdir(tmp_path)) == ["ready", "stress.json"]  # no temporary or lock file left behind


_CALIBRATE_ONCE = """
    import json, torch
    from tnkernels.plan import calibrate
    from tests.test_concurrency import _fake_calibration
    def fake_measure(device, dtype, rounds=3):
        time.sleep(0.5)  # long enough that the others start while this one measures
        with open(os.path.join(os.environ["TNK_CACHE_DIR"], f"measured-{os.getpid()}"), "w"):
            pass
        return _fake_calibration(overhead=os.getpid() * 1e-9)
    calibrate.measure = fake_measure
    together()
    cal = calibrate.get_calibration("cpu", torch.float32)
    print(json.dumps({"overhead": cal.overhead_s}))
"""


def test_processes_starting_together_calibrate_once_and_agree(tmp_path):
    # Each process measured, at the same time as the others (disturbing them), and planned with its own constants.
    outs = _run_together(_CALIBRATE_ONCE, 3, tmp_path)
    assert len({o["overhead"] for o in outs}) == 1, outs  # every process plans with the same constants
    assert len([f for f in os.listdir(tmp_path) if f.startswith("measured-")]) == 1


def test_processes_starting_together_measure_each_thin_bound_once(tmp_path):
    outs = _run_together(
        """
        import json
        from tnkernels.ops.mpo import thin_bounds
        def fake_entry(kind, rank, width):
            time.sleep(0.3)
            return 16 + os.getpid() % 1000
        thin_bounds.measure_entry = fake_entry
        together()
        table = thin_bounds.MeasuredBounds(thin_bounds._load_entries())
        print(json.dumps({"rows": table.min_rows("project", 8, 256)}))
        """,
        2,
        tmp_path,
    )
    assert len({o["rows"] for o in outs}) == 1, outs


def test_damaged_cache_entries_are_measured_again(monkeypatch, tmp_path):
    from tnkernels.ops.tucker import ranks, tuned
    from tnkernels.plan.tucker import TUCKER_KINDS

    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    key = calibrate._key(torch.device("cpu"), torch.float32)
    damaged = calibrate.asdict(_fake_calibration())
    damaged["rates"] = [1, 2]  # valid JSON, wrong type: an AttributeError escaped the forward pass
    (tmp_path / "calibration.json").write_text(json.dumps({key: damaged}))
    monkeypatch.setattr(calibrate, "measure", lambda device, dtype, rounds=3: _fake_calibration(3e-6))
    assert calibrate.get_calibration("cpu", torch.float32).overhead_s == 3e-6

    # a Tucker kind this version does not know (another version's cache) failed every call with a KeyError
    monkeypatch.setenv("TNK_TUCKER_TUNE", "1")
    monkeypatch.setattr(tuned, "_MEMO", {})
    shapes = ((1, 8, 10, 10), (8, 4), (4, 4, 3, 3), (6, 4))
    conv = ((1, 1), (1, 1), (1, 1))
    disk_key = f"{shapes}|{conv}|{torch.float32}|fwd"
    (tmp_path / "tucker_kinds-v2.json").write_text(json.dumps({machine_key(): {disk_key: "bogus"}}))
    monkeypatch.setattr(tuned, "measure", lambda *args: "fold-in")
    assert tuned.kind_for(shapes, conv, torch.float32, torch.device("cpu"), False) in TUCKER_KINDS

    # a machine entry that is not a dict made put() raise a TypeError
    (tmp_path / "other.json").write_text(json.dumps({machine_key(): 5}))
    MachineStore("other.json").put("k", 1)
    assert MachineStore("other.json").load() == {"k": 1}

    # rank timings of the wrong type were indexed (AttributeError) instead of measured again
    monkeypatch.setattr(ranks, "_MEMO", {})
    frontier = ranks.tucker_rank_frontier((16, 16, 3, 3), 2.0)
    rank_key = f"{(16, 16, 3, 3)}|2.0|{conv}|{torch.float32}"
    bad = [f"{r}x{c}" for r, c in frontier]  # the right names, in a list
    (tmp_path / "tucker_ranks-v2.json").write_text(json.dumps({machine_key(): {rank_key: bad}}))
    monkeypatch.setattr(ranks, "_measure", lambda shape, conv, pairs, dtype: dict.fromkeys(pairs, 1.0))
    assert set(ranks.frontier_seconds((16, 16, 3, 3), 2.0, conv, torch.float32)) == set(frontier)


def _forget_warnings(monkeypatch) -> None:
    """Let the one-time warning about an unwritable folder be given again."""
    disk = sys.modules.get("tnkernels.plan.disk")  # imported by calibrate
    if disk is not None:
        monkeypatch.setattr(disk, "_WARNED", set())


def test_unwritable_cache_folder_warns_once_and_never_raises(monkeypatch, tmp_path):
    from tnkernels.ops.mpo import thin_bounds
    from tnkernels.ops.tucker import tuned

    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    monkeypatch.setattr(calibrate, "measure", lambda device, dtype, rounds=3: _fake_calibration(4e-6))
    calibrate.get_calibration("cpu", torch.float32)
    MachineStore("thin_bounds.json").put("project|8|256", 16)
    MachineStore("tucker_kinds-v2.json").put("k", "dense")

    def read_only(*args, **kwargs):  # what a read-only folder does to the write (as root, chmod does not)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    _forget_warnings(monkeypatch)
    with pytest.warns(RuntimeWarning, match="cannot write the cache folder") as caught:
        cal = calibrate.recalibrate("cpu", torch.float32)  # raised PermissionError, installing nothing
        thin_bounds.forget()  # raised too (MachineStore.drop)
        tuned.forget()
    assert len([w for w in caught if "cannot write" in str(w.message)]) == 1
    assert cal.overhead_s == 4e-6 and calibrate.get_calibration("cpu", torch.float32) is cal
    thin_bounds.use(None)


def test_a_file_where_the_cache_folder_should_be(monkeypatch, tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    monkeypatch.setattr(calibrate, "measure", lambda device, dtype, rounds=3: _fake_calibration(5e-6))
    _forget_warnings(monkeypatch)
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert calibrate.recalibrate("cpu", torch.float32).overhead_s == 5e-6
    assert calibrate.get_calibration("cpu", torch.float32).overhead_s == 5e-6


def test_cache_files_are_written_where_os_has_no_fchmod(monkeypatch, tmp_path):
    # Windows before Python 3.13 has no os.fchmod: the 0644 mode of the cache files raised AttributeError (not an
    # OSError, so not the unwritable-folder path) out of the first call of every layer.
    monkeypatch.delattr(os, "fchmod", raising=False)
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    monkeypatch.setattr(calibrate, "measure", lambda device, dtype, rounds=3: _fake_calibration(6e-6))
    assert calibrate.get_calibration("cpu", torch.float32).overhead_s == 6e-6
    MachineStore("thin_bounds.json").put("project|8|256", 16)
    assert MachineStore("thin_bounds.json").load() == {"project|8|256": 16}
    assert json.loads((tmp_path / "calibration.json").read_text())


def test_a_route_derived_while_plans_change_is_not_kept(monkeypatch):
    # Another thread's recalibrate() / options change between a first call and its memo entry: the entry was
    # stamped with the new generation and the layer kept a route derived from the old state.
    import tnkernels.nn.mpo_linear as mpo_linear_module

    layer = MPOLinear(64, 48, in_modes=(64, 1), out_modes=(1, 48), bonds=(4,), backend="torch")
    real = mpo_linear_module.low_rank_route

    def racing(*args, **kwargs):
        cache.clear_plans()  # what the other thread does meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(mpo_linear_module, "low_rank_route", racing)
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer(x)
    cores = tuple(layer.cores)
    assert layer._memo_for_calls.get(x, cores, False) == (False, None)


def test_a_plan_searched_while_plans_are_cleared_is_not_kept(monkeypatch):
    real = cache.decide

    def racing(*args, **kwargs):
        cache.clear_plans()  # recalibrate() in another thread
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "decide", racing)
    shapes = ((1, 8, 8, 3), (3, 8, 8, 1))
    dec = cache.mpo_decision(shapes, 77, torch.float32, torch.device("cpu"), False)
    assert dec.forward.kind  # the caller still gets its plan
    assert not any(k[0] == shapes and k[1] == 77 for k in cache._MPO_PLANS)


def test_threads_share_one_model_on_a_cold_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    measured = []
    monkeypatch.setattr(calibrate, "measure", lambda d, t, rounds=3: measured.append(1) or _fake_calibration())
    cache.clear_plans()
    torch.manual_seed(0)
    low_rank = MPOLinear.from_linear(nn.Linear(96, 80), in_modes=(96, 1), out_modes=(1, 80), max_bond=6)
    chain = MPOLinear(96, 80, in_modes=(8, 12), out_modes=(8, 10), bonds=(5,))  # the native kernel when built
    conv = TuckerConv2d(6, 8, 3, ranks=(4, 3), padding=1)
    inputs = [(torch.randn(1 + 7 * i, 96), torch.randn(1 + i % 2, 6, 7 + i, 7)) for i in range(8)]
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            x, img = inputs[i]
            with torch.no_grad():
                results[i] = [(low_rank(x), chain(x), conv(img)) for _ in range(5)]
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors and len(measured) == 1
    with torch.no_grad():
        for (x, img), got in zip(inputs, results):
            want = (low_rank(x), chain(x), conv(img))
            for outs in got:
                assert all(torch.equal(a, b) for a, b in zip(outs, want))


def test_a_child_forked_while_a_thread_holds_the_lock_does_not_keep_it(tmp_path):
    from tnkernels.plan import disk

    entered, release = threading.Event(), threading.Event()

    def holder() -> None:
        with disk.locked(str(tmp_path)):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=holder, daemon=True)
    t.start()
    assert entered.wait(10)
    pid = os.fork()
    if pid == 0:  # the child outlives the parent's lock: its inherited copy must not keep it
        time.sleep(2)
        os._exit(0)
    try:
        release.set()
        t.join(10)
        start = time.monotonic()
        fd = disk._acquire(str(tmp_path))
        assert fd is not None and time.monotonic() - start < 1.0
        os.close(fd)
    finally:
        os.waitpid(pid, 0)


def test_dataloader_workers_run_the_layers_after_the_parent(tmp_path):
    # fork after the parent ran the layers (native kernel and OpenMP included): the workers must neither hang nor
    # compute something else (a guard; found fine on 2026-12-02)
    script = """
        import torch
        from tnkernels.nn import MPOLinear, TuckerConv2d
        from tnkernels.plan import set_calibration
        from tests.test_concurrency import _fake_calibration
        set_calibration(_fake_calibration())  # not the point here, and 2-4 s
        torch.manual_seed(0)
        chain = MPOLinear(256, 384, in_modes=(16, 16), out_modes=(16, 24), bonds=(12,))
        conv = TuckerConv2d(16, 32, 3, ranks=(8, 8), padding=1)
        x, img = torch.randn(64, 256), torch.randn(2, 16, 12, 12)
        with torch.no_grad():
            ref = (chain(x[:3]), chain(x), conv(img))
            chain(torch.randn(512, 256))
        class Data(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                with torch.no_grad():
                    got = (chain(x[:3]), chain(x), conv(img))
                return torch.tensor(all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, ref)))
        loader = torch.utils.data.DataLoader(Data(), num_workers=2, batch_size=None, timeout=30)
        print(json.dumps([bool(ok) for ok in loader]))
    """
    (out,) = _run_together("import json\ntogether()\n" + textwrap.dedent(script), 1, tmp_path)
    assert out == [True] * 4

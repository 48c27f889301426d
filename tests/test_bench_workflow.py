"""The benchmark workflows as a user runs them: the pytest-benchmark suite in bench/ (started with the plain
`pytest` command, saving and comparing runs), and the bench/ scripts' refusal of flags that would time nothing or
record wrong numbers. Nothing here times anything that matters: the grid's cells are replaced by canned records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = str(ROOT / "bench" / "test_bench_mpo.py")
# the `pytest` command, run from another folder: unlike `python -m pytest` in the repository root, nothing puts
# the root on sys.path
PYTEST = [sys.executable, "-c", "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"]


def _pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [*PYTEST, SUITE, "-p", "no:cacheprovider", "-q", *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_benchmark_suite_collects_with_the_pytest_command_from_any_folder(tmp_path):
    done = _pytest(tmp_path, "--collect-only", "-k", "lookup")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_cached_plan_lookup" in done.stdout


@pytest.mark.parametrize(
    "flags", [["--benchmark-autosave"], ["--benchmark-save=base"], ["--benchmark-compare", "--benchmark-json=x"]]
)
def test_saving_or_comparing_without_benchmark_enable_is_refused(tmp_path, flags):
    # pyproject's addopts has --benchmark-disable: these used to save nothing, or compare nothing, and pass
    store = tmp_path / "store"
    done = _pytest(tmp_path, "-k", "lookup", f"--benchmark-storage={store}", *flags)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "--benchmark-enable" in done.stderr
    assert not store.exists() and not (tmp_path / "x").exists()


def test_saved_benchmarks_record_torch_threads_and_tnkernels():
    import torch

    from bench import conftest

    info: dict = {}
    conftest.pytest_benchmark_update_machine_info(None, info)
    assert info["torch_threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert info["tnkernels"] and isinstance(info["tnkernels_native"], bool)


@pytest.fixture
def canned_grid(monkeypatch):
    """run_grid with every cell replaced by a canned record; returns (module, list of the cells it was asked)."""
    run_grid = pytest.importorskip("bench.run_grid")
    asked = []

    def cell(kind):
        def bench(name, rows, ratio, passes, *args, **kwargs):
            asked.append((kind, name, ratio, rows, passes))
            times = {"dense": 2e-3, "tnkernels": 1e-3}
            return dict(kind=kind, layer=name, shape=[8, 8], ratio=ratio, rows=rows, passes=passes, plan="p",
                        times_s=times, skipped={}, roofline_speedup=2.5, roofline_tnk_s=4e-4)  # fmt: skip

        return bench

    monkeypatch.setattr(run_grid, "bench_linear", cell("linear"))
    monkeypatch.setattr(run_grid, "bench_conv", cell("conv"))
    return run_grid, asked


@pytest.mark.parametrize(
    "flags",
    [
        ["--passes", "fwd,bwd"],  # used to time a training step labelled "bwd" with a forward-only roofline
        ["--passes", ""],
        ["--threads", "-1"],
        ["--quick", "--preset", "full"],  # --quick used to win silently
        ["--out", "FILE"],
    ],
)
def test_grid_refuses_bad_flags_before_timing(tmp_path, canned_grid, flags):
    run_grid, asked = canned_grid
    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / f) if f == "FILE" else f for f in flags]
    out = ["--out", str(tmp_path / "out")] if "--out" not in flags else []
    with pytest.raises(SystemExit) as exc:
        run_grid.main(["--preset", "smoke", *out, *flags] if "--preset" not in flags else [*out, *flags])
    assert exc.value.code == 2 and not asked


def test_grid_records_where_it_ran(tmp_path, canned_grid):
    run_grid, asked = canned_grid
    args = ["--preset", "smoke", "--passes", "fwd", "--threads", "1", "--out", str(tmp_path)]
    first = run_grid.main(args)
    env = first["environment"]
    assert env["versions"]["tnkernels"] and "git_commit" in env and isinstance(env["native"], bool)
    assert first["command"] == "python -m bench.run_grid " + " ".join(args)
    md = (tmp_path / "grid-smoke.md").read_text()
    assert "1 thread(s)" in md and f"tnkernels {env['versions']['tnkernels']}" in md
    # speed-up columns are dense time over tnkernels time (2 ms / 1 ms), the roofline column as recorded
    assert "| 2.000 | 1.000 | 2.00x | 2.50x |" in md
    assert len(asked) == 2


def test_grid_resumes_only_a_run_with_the_same_settings(tmp_path, canned_grid):
    run_grid, asked = canned_grid
    args = ["--preset", "smoke", "--passes", "fwd", "--threads", "1", "--out", str(tmp_path)]
    records = run_grid.main(args)["records"]
    # an interrupted run made with other settings (here 2 threads) must not be mixed into a 1-thread result
    partial = tmp_path / "grid-smoke.partial.json"
    other = dict(threads=2, peers=True, passes=["fwd"], check_plans=False)
    partial.write_text(json.dumps(dict(preset="smoke", settings=other, records=records)))
    second = run_grid.main(args)
    assert len(asked) == 4, "cells of a run with other settings were resumed"
    partial.write_text(json.dumps(dict(preset="smoke", settings=second["settings"], records=records)))
    run_grid.main(args)
    assert len(asked) == 4, "the same settings must resume"


@pytest.mark.parametrize("flags", [["--rounds", "0"], ["--reps", "0"], ["--quick", "--smoke"]])
def test_plan_check_refuses_flags_that_time_nothing(tmp_path, flags):
    plan_check = pytest.importorskip("bench.plan_check")
    # with 0 rounds or reps every kind "measured" infinity and the pick was judged within 10% at 100% of points
    with pytest.raises(SystemExit) as exc:
        plan_check.main(["--smoke", *flags] if "--smoke" not in flags else flags)
    assert exc.value.code == 2


def test_plan_check_records_the_commit(tmp_path):
    plan_check = pytest.importorskip("bench.plan_check")
    out = plan_check.main(["--smoke", "--rounds", "1", "--reps", "1", "--structure", "auto"])
    assert out["tnkernels"] and "git_commit" in out and isinstance(out["native"], bool)


@pytest.mark.parametrize("flags", [["--pairs", "4-4"], ["--pairs", "0x3"], ["--rounds", "0"]])
def test_tucker_rank_ab_refuses_bad_flags(flags):
    tucker_rank_ab = pytest.importorskip("bench.tucker_rank_ab")
    with pytest.raises(SystemExit) as exc:
        tucker_rank_ab.main(["--channels", "8", "--size", "4", *flags])
    assert exc.value.code == 2


def test_tucker_rank_ab_default_pairs():
    tucker_rank_ab = pytest.importorskip("bench.tucker_rank_ab")
    rows = tucker_rank_ab.main(["--channels", "8", "--size", "4", "--rounds", "1"])
    assert [r["provider"].split()[0] for r in rows] == ["dense", "39x38", "32x46", "44x33", "40x37", "48x30"]


def test_ab_table_writes_into_a_new_folder_atomically(tmp_path):
    from bench.ab_common import Table

    table = Table("t", 1, "what", ["a", "b"])
    table.row(1, 2)
    target = tmp_path / "new" / "t.md"
    table.write(target)  # used to fail after the whole run when the folder did not exist
    assert target.read_text().splitlines()[-1] == "| 1 | 2 |"
    assert [p.name for p in target.parent.iterdir()] == ["t.md"]


@pytest.mark.parametrize("flags", [["--ratio", "0"], ["--layers", "0"]])
def test_load_memory_refuses_bad_flags_before_starting_workers(tmp_path, flags):
    load_memory = pytest.importorskip("bench.load_memory")
    with pytest.raises(SystemExit) as exc:
        load_memory.main([*flags, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2


def test_benchmark_suite_warms_up_and_groups_by_case():
    """pytest-benchmark does not warm up on CPython: a layer's first call (plan search, measured kernels, call
    memo) must not be the first call it times, or it sizes the rounds by it (5 rounds instead of hundreds). And
    every test names its group, since `--benchmark-group-by=param:case` (the suite's documented grouping) raised a
    KeyError at the end of a run on the tests without a `case` parameter."""
    suite = pytest.importorskip("bench.test_bench_mpo")
    from tnkernels.plan import clear_plans, plan_stats

    class FirstCall:
        group = None

        def __call__(self, fn, *args):
            before = plan_stats()["searches"]
            fn(*args)
            self.searches = plan_stats()["searches"] - before

    for test, args, group in (
        (suite.test_linear_forward, ("minilm-mlp-up-r64-x4", "tnkernels"), "minilm-mlp-up-r64-x4 forward"),
        (suite.test_linear_forward_backward, ("minilm-mlp-up-r64-x4", "dense"), "minilm-mlp-up-r64-x4 forward+"),
        (suite.test_linear_forward_backward, ("minilm-mlp-up-r64-x4", "tnkernels"), "minilm-mlp-up-r64-x4 forward+"),
        (suite.test_linear_recompute_time, (True,), "recompute"),
        (suite.test_conv_forward, ("dense", 256, 14), "conv256-14x14"),
        (suite.test_cached_plan_lookup, (), "plan lookup"),
    ):
        clear_plans()
        bench = FirstCall()
        test(bench, *args)
        assert bench.searches == 0, f"{test.__name__}{args}: the timed first call planned"
        assert bench.group and bench.group.startswith(group), (test.__name__, bench.group)

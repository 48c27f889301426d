"""pytest setup for the pytest-benchmark suite in bench/ (bench/test_bench_mpo.py).

- The suite imports `bench.*`, which is not an installed package: the repository root goes on sys.path, so the
  documented `pytest bench/test_bench_mpo.py --benchmark-enable` works with the `pytest` command as well as with
  `python -m pytest`, from any folder.
- pyproject.toml's addopts has `--benchmark-disable` (the unit tests must not time anything). Saving or comparing
  benchmarks without `--benchmark-enable` would then save nothing and never fail a `--benchmark-compare-fail`
  gate, silently: it is refused instead.
- Every saved run's machine_info records the torch version, torch's thread count, the tnkernels version and
  whether the native kernels are built, so that `--benchmark-compare` warns when two runs differ in those.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# option dest -> flag, for the options that only make sense when benchmarks are timed
_NEEDS_TIMING = {
    "benchmark_save": "--benchmark-save",
    "benchmark_autosave": "--benchmark-autosave",
    "benchmark_json": "--benchmark-json",
    "benchmark_compare": "--benchmark-compare",
    "benchmark_compare_fail": "--benchmark-compare-fail",
}


def benchmarks_disabled_but_asked(config) -> list[str]:
    """The saving / comparing flags given while benchmarks are disabled (empty when fine)."""
    try:
        disabled = config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
    except ValueError:  # pytest-benchmark not loaded (-p no:benchmark): nothing to check
        return []
    if not disabled:
        return []
    return [flag for dest, flag in _NEEDS_TIMING.items() if config.getoption(dest, None) not in (None, False, [])]


def pytest_configure(config):
    asked = benchmarks_disabled_but_asked(config)
    if asked:
        raise pytest.UsageError(
            f"{', '.join(asked)} given while benchmarks are disabled (pyproject.toml's addopts has "
            "--benchmark-disable): nothing would be timed, saved or compared. Add --benchmark-enable."
        )


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    import tnkernels

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["tnkernels"] = tnkernels.__version__
    machine_info["tnkernels_native"] = bool(tnkernels.native_available())

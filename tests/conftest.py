"""Test setup shared by every test module.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is the first thing this file does: on this
CPU-only CI the Triton kernels run in the interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The thin kernels' bounds are measured per machine (tnkernels/ops/mpo/thin_bounds.py); tests that count which
# kernel ran use the fixed table, so that the counts do not depend on the CI machine's BLAS. test_thin_bounds.py
# measures and swaps tables itself.
os.environ.setdefault("TNK_THIN_BOUNDS", "fixed")
# Likewise the Tucker plan kind is timed per machine on a CPU (tnkernels/ops/tucker/tuned.py); tests that check
# which kind runs use the cost model's pick. test_tucker_tuned.py and test_tucker_ranks.py turn it on (tucker_timing).
os.environ.setdefault("TNK_TUCKER_TUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import tolerance  # noqa: E402,F401  (re-exported for convenience)


@pytest.fixture
def tucker_timing(monkeypatch, tmp_path):
    """Timing of Tucker kinds and ranks on (test_tucker_tuned.py, test_tucker_ranks.py), a fresh cache folder,
    and empty memories; the cache folder is returned."""
    from tnkernels.ops.tucker import ranks, tuned

    monkeypatch.setenv("TNK_TUCKER_TUNE", "1")
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuned, "_MEMO", {})
    monkeypatch.setattr(ranks, "_MEMO", {})
    return tmp_path


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_threads():
    """`tnk compress --threads 1` and `run_grid --threads 1`, run in-process by CLI tests, set torch's thread count
    for the rest of the process: later tests then ran at another thread count than their subprocesses (the
    machine key of the cache files differs) depending on test order."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def nan_poison(monkeypatch):
    """Make torch.empty / empty_like / Tensor.new_empty return NaN-filled floating tensors, so a kernel that leaves
    part of a fresh output unwritten (or reads uninitialized memory) fails loudly instead of passing on lucky
    garbage."""

    def poisoned(real):
        def make(*args, **kwargs):
            t = real(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t

        return make

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
    yield

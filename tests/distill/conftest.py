"""distill tests run single-threaded: CI shares 2 cores among several pytest workers/engineers, and OpenMP
threads spinning against each other made a 6 s slice-training run take 90 s (measured)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
